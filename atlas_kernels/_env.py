"""Facts about the running environment, shared by kernels, ops and modules."""
import os


def is_interpreter() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
