"""Old name of `paged.kernels.triton_decode` (the Triton paged-decode kernel), kept for scripts and tests.

`import paged.triton_decode` gives that very module object, so a monkeypatch of it reaches the cache too.
"""

import sys

from paged.kernels import triton_decode as _kernel

sys.modules[__name__] = _kernel
