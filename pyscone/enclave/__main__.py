"""``python -m pyscone.enclave`` is not how an enclave starts.

``pyscone run`` starts the enclave interpreter with its measuring loader
(``enclave/loader.py``: ``python -I -S -c BOOTSTRAP``), which records every byte the boot
loads; a boot started any other way would load code that no measurement covers.
"""

import sys

print("pyscone: an enclave is started by pyscone run (through its measuring loader), not by hand", file=sys.stderr)
sys.exit(2)
