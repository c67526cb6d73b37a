"""Cut the CUDA architectures that a kernel package's setup.py compiles for down to one.

mamba-ssm and causal-conv1d list every architecture in setup.py ("-gencode", "arch=compute_XX,code=sm_XX"
pairs appended to cc_flag) and ignore TORCH_CUDA_ARCH_LIST for them, which multiplies the build time
by the number of architectures. tests/gpu_check.sh runs this on unpacked sdists:

    python tests/keep_arch.py 90 build/mamba_ssm-2.3.2.post1/setup.py build/causal_conv1d-1.5.2/setup.py
"""
import re
import sys

GENCODE_PAIR = re.compile(r'\n([ \t]*)cc_flag\.append\("-gencode"\)\s*'
                          r'\n[ \t]*cc_flag\.append\("arch=compute_(\w+),code=sm_\2"\)')


def keep_arch(setup_text, arch):
    """setup.py's text with every gencode pair removed but the one for sm_<arch>; raises if that
    one is not there (the build would then target no GPU at all)."""
    kept = []

    def keep_or_drop(match):
        kept.append(match.group(2) == arch)
        return match.group(0) if match.group(2) == arch else f"\n{match.group(1)}pass"

    text = GENCODE_PAIR.sub(keep_or_drop, setup_text)
    if kept and not any(kept):
        raise ValueError(f"setup.py builds for no sm_{arch}; it lists other architectures only")
    return text


if __name__ == "__main__":
    arch, *paths = sys.argv[1:]
    for path in paths:
        with open(path) as f:
            text = keep_arch(f.read(), arch)
        with open(path, "w") as f:
            f.write(text)
        print(f"{path}: building for sm_{arch} only")
