"""Set the GPU architectures mamba-ssm's selective-scan kernel is compiled for.

mamba-ssm's setup.py hard-codes its list (nine architectures with CUDA 13) and ignores
TORCH_CUDA_ARCH_LIST, so every build compiles each kernel file nine times. This rewrites the list in
an unpacked sdist's setup.py to the compute capabilities given (without the dot: "80;89;90"), and
refuses a setup.py whose layout is not the one it knows.

Run: python mamba_ssm_archs.py SETUP_PY "80;89;90"
"""
from __future__ import annotations

import re
import sys

MARKER = "    # HACK: The compiler flag"  # the line after the architecture list in mamba-ssm 2.2-2.3


def with_archs(setup_py: str, archs: str) -> str:
    """setup_py's text with cc_flag set to the -gencode flags of `archs` just after its own list."""
    names = [a.strip() for a in archs.split(";") if a.strip()]
    if not names or not all(re.fullmatch(r"\d{2,3}[af]?", a) for a in names):
        raise ValueError(f"architectures {archs!r}: expected compute capabilities without the dot, e.g. '80;89;90'")
    if setup_py.count(MARKER) != 1 or "cc_flag.append(\"arch=compute_" not in setup_py:
        raise ValueError("this setup.py does not have the layout of mamba-ssm 2.2-2.3 (its architecture list "
                         "followed by the '# HACK: The compiler flag' comment); patch its cc_flag list by hand")
    flags = [flag for a in names for flag in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    return setup_py.replace(MARKER, f"    cc_flag = {flags!r}  # set by diffcraft's mamba_ssm_archs.py\n{MARKER}")


if __name__ == "__main__":
    path, archs = sys.argv[1], sys.argv[2]
    try:
        text = with_archs(open(path).read(), archs)
    except ValueError as err:
        sys.exit(f"{path}: {err}")
    open(path, "w").write(text)
    print(f"{path}: mamba-ssm's kernels compile for sm_{', sm_'.join(a for a in archs.split(';') if a)} only")
