"""TensorRT engines from the exported ONNX: profiles, plan compatibility, building (no torch).

Only `build.py` (lazily) and `vpexport.runtime.trt_session` import `tensorrt`; the rest is pure
Python and tested on CPU.
"""

from vpexport.engine.compat import check_plan_compatible, parse_version
from vpexport.engine.profiles import LengthSpec, compute_profile
from vpexport.engine.report import format_engines

__all__ = ["check_plan_compatible", "parse_version", "LengthSpec", "compute_profile", "format_engines"]
