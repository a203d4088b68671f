"""DICOM input and output: series loading, the network services, and the result writers."""
