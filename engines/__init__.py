"""ONNX -> TensorRT plans for the local GPU: build (build.py), cache (cache.py), parity check
against ONNX Runtime (verify.py) and the `appliance engines` command (cli.py).

Nothing here imports tensorrt or pycuda at module level: the modules are handed in, so the
package imports (and `engines list` works) on machines without a GPU.
"""
