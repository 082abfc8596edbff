"""The CPU bf16 --compile_unet guard: torch inductor's AVX-512 code for a transformer block's bf16 residual add +
LayerNorm gives NaN, so that combination is refused where inductor would emit 512-bit code, and allowed elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE

from tcdistill.config import ConfigError, TrainConfig


def test_bf16_compile_on_an_avx512_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `--mixed_precision bf16 --compile_unet` on an AVX-512 CPU trained on a NaN loss from step 1 (torch inductor's
    AVX-512 code for bf16 transformer blocks returned garbage; the torch repro is in check_environment's comment). It
    stops before any weights load, in one line naming what runs there; 256-bit (AVX2) code, fp32 compiled, bf16 eager
    and bf16 on a GPU go on."""
    from tcdistill import preflight

    cpu, bf16_compiled = torch.device("cpu"), TrainConfig(**BASE, mixed_precision="bf16", compile_unet=True)
    monkeypatch.setattr(preflight, "inductor_cpu_vector_bits", lambda: 512)
    with pytest.raises(ConfigError, match=r"--compile_unet with --mixed_precision bf16 on this CPU.*--mixed_precision no with --compile_unet"):
        preflight.check_environment(bf16_compiled, cpu)
    for kw in (dict(mixed_precision="no", compile_unet=True), dict(mixed_precision="bf16")):
        preflight.check_environment(TrainConfig(**BASE, **kw), cpu)
    preflight.check_environment(bf16_compiled, torch.device("cuda"))
    monkeypatch.setattr(preflight, "inductor_cpu_vector_bits", lambda: 256)
    preflight.check_environment(bf16_compiled, cpu)


def test_the_avx512_probe_without_a_cpp_compiler_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the probe behind the AVX-512 refusal builds test programs with inductor's C++ compiler; without one (CXX
    unset, no g++) it raised InvalidCxxCompiler as a traceback in preflight for every bf16 --compile_unet CPU run.
    It now reads as scalar code (0 bits): nothing is refused here, and the compile reports the compiler as before."""
    import torch._inductor.cpu_vec_isa as cpu_vec_isa
    from torch._inductor.exc import InvalidCxxCompiler

    from tcdistill import preflight

    def no_compiler() -> None:
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", no_compiler)
    assert preflight.inductor_cpu_vector_bits() == 0
    preflight.check_environment(TrainConfig(**BASE, mixed_precision="bf16", compile_unet=True), torch.device("cpu"))


def test_the_avx512_refusal_follows_the_vector_width_inductor_compiles_for() -> None:
    """Mutation testing: the refusal above was checked with the width monkeypatched only. It reads the width inductor
    will generate code for, which follows `cpp.simdlen`: 256-bit code on this CPU is allowed, 512-bit code refused."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from tcdistill.preflight import check_environment, inductor_cpu_vector_bits

    cfg, cpu = TrainConfig(**BASE, mixed_precision="bf16", compile_unet=True), torch.device("cpu")
    for bits in (256, 512):
        with inductor_config.patch({"cpp.simdlen": bits}):
            if pick_vec_isa().bit_width() != bits:
                continue  # a CPU without that vector width: inductor falls back to another
            assert inductor_cpu_vector_bits() == bits
            if bits == 512:
                with pytest.raises(ConfigError, match="--compile_unet with --mixed_precision bf16 on this CPU"):
                    check_environment(cfg, cpu)
            else:
                check_environment(cfg, cpu)
    with inductor_config.patch({"cpp.simdlen": 1}):  # no vector ISA of that width: scalar code
        assert inductor_cpu_vector_bits() == 0


@pytest.mark.slow
def test_256_bit_inductor_code_gets_the_refused_kernel_right() -> None:
    """The premise of the AVX-512 refusal above: the kernel torch inductor got wrong in 512-bit code (a bf16 residual
    add + LayerNorm over a [1, 64, 64] tensor whose other operand is transposed, as a transformer block sees it) is
    right in 256-bit code, so bf16 --compile_unet stays allowed on an AVX2 CPU."""
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F

    def block_norm(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(a + h, (64,), eps=1e-5)

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 64, 64, generator=gen).bfloat16()
    h = torch.randn(1, 64, 64, generator=gen).bfloat16().transpose(1, 2)
    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.simdlen": 256}):
            out = torch.compile(block_norm, backend="inductor", dynamic=False)(a, h)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out.float(), block_norm(a, h).float(), atol=0.07, rtol=0.02)


def test_compile_on_a_torch_without_its_apis_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: pyproject allows torch >= 2.4, but --compile_unet calls torch.compiler.set_stance (torch 2.6+) for validation
    and --compile_scope blocks dynamo's recompile_limit (2.7+): on an older torch each was an AttributeError traceback
    after the weights loaded. Both are one line before any weights load; an eager run is not refused."""
    from types import SimpleNamespace

    import torch._dynamo

    from tcdistill import preflight

    cpu = torch.device("cpu")
    compiled = dict(mixed_precision="no", compile_unet=True)
    monkeypatch.setattr(torch._dynamo, "config", SimpleNamespace())  # a dynamo config without recompile_limit
    with pytest.raises(ConfigError, match=r"^--compile_unet needs torch\._dynamo\.config\.recompile_limit \(torch 2\.7\+\), which torch"):
        preflight.check_environment(TrainConfig(**BASE, **compiled, compile_scope="blocks"), cpu)
    preflight.check_environment(TrainConfig(**BASE, **compiled), cpu)  # whole-UNet compile does not use it
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ConfigError, match=r"^--compile_unet needs torch\.compiler\.set_stance \(torch 2\.6\+\).*without --compile_unet\.$"):
        preflight.check_environment(TrainConfig(**BASE, **compiled), cpu)
    preflight.check_environment(TrainConfig(**BASE, mixed_precision="no"), cpu)
