"""Compile, in parallel, the fp32 variants the fp32 tests and benchmark use (a subset of `python -m
cuflash warmup`, for a short device session)."""
from cuflash import _compile, _dispatch

if __name__ == "__main__":  # the compile pool spawns processes that import this module
    arch = _compile.device_arch()
    variants = []
    for d in _dispatch.FP32_HEAD_DIM_BUCKETS:
        for causal in (False, True):
            variants += [_dispatch.choose_fwd("float32", d, causal, arch=arch), *_dispatch.choose_bwd("float32", d, causal)]
    for alibi, softcap, dropout in ((True, True, True), (True, False, True), (False, True, True), (True, True, False)):
        variants += [_dispatch.choose_fwd("float32", 64, True, arch=arch, alibi=alibi, softcap=softcap, dropout=dropout),
                     *_dispatch.choose_bwd("float32", 64, True, None, alibi, softcap, dropout)]
    variants += [_dispatch.choose_fwd("float32", 64, False, arch=arch, mask_blocks=(64, 64)),
                 *_dispatch.choose_bwd("float32", 64, False, (64, 64))]
    variants = list(dict.fromkeys(variants))
    for _ in _compile.precompile(variants, arch):
        pass
    print(f"{len(variants)} fp32 variants ready")
