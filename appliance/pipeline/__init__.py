"""The analysis stages: arrays and small dataclasses in, arrays and small dataclasses out."""
