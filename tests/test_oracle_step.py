"""An independent oracle for whole training steps: the project's Trainer takes two optimizer steps on a tiny teacher, and
a from-scratch implementation of tcd-reference.md's "One training step", built only from diffusers / transformers /
peft / torch pieces (none of tcdistill's math), takes the same two steps from the same inputs. Losses, gradients
(AdamW's first moment), the student's weights after each step and the full model's EMA target must agree to fp32
rounding.

The seam: the trainer's `draw_tcd` is wrapped so that the real draw still runs (its output is checked against the
spec's distribution rules) but the step uses chosen `(t, s, w, eps)` rows covering the edge cases: t = 999, t = 19
(t_n = 0), s == t_n (identity target), s = 0 and s strictly between. The VAE's posterior sample is reproduced by
restoring torch's RNG state, taken (through a wrapped `encode_latents`) just before the trainer's VAE call. The text
conditioning is recomputed by the oracle from the captions (one of them empty), so the prompt encoding, the
unconditional prompt and the tokenizer length are checked too. After each step the oracle takes over the trainer's
weights and optimizer state, so every step is compared from the same state.

The runs use --adam_epsilon 1e-6 (not 1e-8): an AdamW step is ~lr g / (|g| + eps), so with eps far below the fp32
noise of near-zero gradients those elements' updates are noise too.

Conventions taken from the spec and diffusers' LCM scripts (train_lcm_distill_*_wds.py), which the TCD scripts patch:
- w is the LCM-form guidance, `x0_w = x0_c + w (x0_c - x0_u)` (CFG scale w + 1), drawn in [w_min, w_max];
- the full student gets `timestep_cond = get_guidance_scale_embedding(w, 256)`, where diffusers' own function
  multiplies by 1000 (so the embedded value is 1000 w, as the spec says, and the pipeline's `guidance_scale - 1`
  at sampling is the same w);
- the LoRA student gets no w; its target is the online student under no_grad; its teacher the frozen base UNet.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerator_state")  # each case builds its own Accelerator
T_TRAIN, N_DDIM = 1000, 50
K = T_TRAIN // N_DDIM
# tcd-reference.md, "Flags": the reference's LoRA target modules.
SPEC_LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
CAPTIONS = ["a red circle on a blue background", "", "a green square on a white background", "a blue triangle"]
# Per step: (t, s, w) for the 4 rows. Step 1: t = 999 to s = 0; s == t_n (identity target); t = 19, so t_n = 0 = s
# (identity at the boundary); s strictly between 0 and t_n. Step 2: s == t_n = 19, then three more.
STEPS = [
    ([999, 499, 19, 259], [0, 479, 0, 119], [5.0, 15.0, 7.3, 11.9]),
    ([39, 999, 639, 139], [19, 539, 379, 0], [6.1, 14.2, 9.9, 3.5]),
]
MICRO_ROWS = [STEPS[0], STEPS[1], STEPS[1], STEPS[0]]  # one per micro-batch, in order (2 optimizer steps x accumulation)


@pytest.fixture(scope="module")
def teachers(tiny_teacher: Path, vpred_teacher: Path, sdxl_teacher: Path, sample_teacher: Path, zero_snr_teacher: Path) -> dict[str, Path]:
    return {"sd": tiny_teacher, "vpred": vpred_teacher, "sdxl": sdxl_teacher, "sample": sample_teacher, "zero_snr": zero_snr_teacher}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Only for the Trainer's start-up shard check: the steps below are fed explicit batches."""
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    path = tmp_path_factory.mktemp("oracle_shards")
    write_tiny_shards(path, n_shards=1, per_shard=2, image_size=32, seed=0)
    return shard_pattern(path, 1)


# ----------------------------------------------------------------------------------------------------- the oracle
@dataclass
class Oracle:
    """Spec-only implementation of one TCD/LCM training step (tcd-reference.md, "One training step")."""

    pipe: Any  # the teacher pipeline, loaded from its folder by diffusers
    family: str
    variant: str
    cfg: dict[str, Any]
    ab: torch.Tensor = field(init=False)  # DDPMScheduler's alphas_cumprod, float64
    prediction_type: str = field(init=False)

    def __post_init__(self) -> None:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.ab = sched.alphas_cumprod.double()
        self.prediction_type = sched.config.prediction_type
        self.teacher = self.pipe.unet.requires_grad_(False).eval()

    # --- models
    def full_student(self) -> torch.nn.Module:
        """Teacher config + time_cond_proj_dim 256, teacher weights non-strict, the new w projection zero-initialised."""
        from diffusers import UNet2DConditionModel

        student = UNet2DConditionModel.from_config(dict(self.teacher.config), time_cond_proj_dim=256)
        missing, unexpected = student.load_state_dict(self.teacher.state_dict(), strict=False)
        assert not unexpected and missing == ["time_embedding.cond_proj.weight"], (missing, unexpected)
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.float().train()

    def lora_student(self, rank: int, alpha: int) -> torch.nn.Module:
        from peft import LoraConfig

        student = copy.deepcopy(self.teacher)
        student.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=SPEC_LORA_MODULES,
                                       init_lora_weights="gaussian"))
        return student.train()

    # --- inputs
    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor

    @torch.no_grad()
    def text(self, captions: list[str], batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(cond, uncond) UNet kwargs; tokenized to each tokenizer's own model_max_length (not 77)."""
        p = self.pipe

        def ids(tok: Any, prompts: list[str]) -> torch.Tensor:
            return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids

        n = len(captions)
        if self.family == "sd":
            hidden = p.text_encoder(ids(p.tokenizer, captions))[0]
            empty = p.text_encoder(ids(p.tokenizer, [""] * n))[0]  # SD: the unconditional prompt is the encoding of ""
            return {"encoder_hidden_states": hidden}, {"encoder_hidden_states": empty}
        h1 = p.text_encoder(ids(p.tokenizer, captions), output_hidden_states=True).hidden_states[-2]
        out2 = p.text_encoder_2(ids(p.tokenizer_2, captions), output_hidden_states=True)
        hidden, pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2[0]
        res = self.cfg["resolution"]
        # diffusers' SDXL scripts: original_size + crop_top_left + (resolution, resolution)
        time_ids = torch.cat([batch["original_sizes"].float(), batch["crop_top_lefts"].float(),
                              torch.full((n, 2), float(res))], dim=1)
        cond = {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        # SDXL (LCM-SDXL scripts): zero prompt and pooled embeddings, the same time ids
        uncond = {"encoder_hidden_states": torch.zeros_like(hidden),
                  "added_cond_kwargs": {"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}}
        return cond, uncond

    # --- math (float64 around the fp32 networks)
    def a_s(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.ab[t].view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt()

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.a_s(t)
        out = out.double()
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "sample":
            return out, (x - a * out) / s
        assert self.prediction_type == "v_prediction"
        return a * x - s * out, a * out + s * x

    def consistency(self, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        x0_hat, _ = self.x0_eps(out, x, t)
        if self.cfg.get("distill_mode", "tcd") == "lcm":  # LCM: c_skip x + c_out x0_hat (diffusers' LCM scripts)
            st = self.cfg.get("timestep_scaling_factor", 10.0) * t.double().view(-1, 1, 1, 1)
            return 0.25 / (st**2 + 0.25) * x + st / (st**2 + 0.25) ** 0.5 * x0_hat
        # TCF, exponential-integrator form: (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) x0_hat, h = lambda_s - lambda_t
        a_t, sg_t = self.a_s(t)
        a_s, sg_s = self.a_s(s)
        h = torch.log(a_s / sg_s) - torch.log(a_t / sg_t)
        return (sg_s / sg_t) * x - a_s * torch.expm1(-h) * x0_hat

    def unet(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, kw: dict[str, Any],
             w: torch.Tensor | None) -> torch.Tensor:
        extra = {}
        if w is not None:
            from diffusers import StableDiffusionPipeline

            extra["timestep_cond"] = StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float(), embedding_dim=256)
        return net(x.float(), t, **kw, **extra, return_dict=False)[0]

    def loss(self, student: torch.nn.Module, target: torch.nn.Module, x0: torch.Tensor, cond: dict, uncond: dict,
             t: torch.Tensor, s: torch.Tensor, w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t_n = (t - K).clamp(min=0)
        a_t, sg_t = self.a_s(t)
        z = a_t * x0.double() + sg_t * eps.double()
        w_in = w if self.variant == "full" else None
        with torch.no_grad():
            x0_c, eps_c = self.x0_eps(self.unet(self.teacher, z, t, cond, None), z, t)  # two separate passes
            x0_u, eps_u = self.x0_eps(self.unet(self.teacher, z, t, uncond, None), z, t)
            wb = w.double().view(-1, 1, 1, 1)
            x0_w, eps_w = x0_c + wb * (x0_c - x0_u), eps_c + wb * (eps_c - eps_u)
            a_n, sg_n = self.a_s(t_n)
            x_prev = a_n * x0_w + sg_n * eps_w  # one DDIM step to t_n
            tgt = self.consistency(x_prev, self.unet(target, x_prev, t_n, cond, w_in), t_n, s)
        pred = self.consistency(z, self.unet(student, z, t, cond, w_in), t, s)
        d = pred - tgt
        if self.cfg.get("loss_type", "l2") == "huber":
            c = self.cfg.get("huber_c", 0.001)
            return torch.mean(torch.sqrt(d**2 + c**2) - c)
        return torch.mean(d**2)


# ---------------------------------------------------------------------------------------------------- the harness
def _pipeline(family: str, path: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(path))


def _batch(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "captions": list(CAPTIONS),
            "original_sizes": torch.tensor([[32, 32], [40, 32], [64, 48], [32, 40]]),
            "crop_top_lefts": torch.tensor([[0, 0], [4, 0], [16, 8], [0, 3]])}


def _check_real_draw(draw: Any, grid: torch.Tensor, w_min: float, w_max: float, mode: str) -> None:
    """The trainer's real draw follows the spec: t on the grid, t_n = max(t - k, 0), s = max(grid[j] - k, 0) with
    j <= i (s = 0 for LCM), w in [w_min, w_max], eps shaped like x0."""
    t, t_n, s = draw.steps.t, draw.steps.t_n, draw.steps.s
    i = torch.searchsorted(grid, t)
    assert torch.equal(grid[i], t) and torch.equal(t_n, (t - K).clamp(min=0))
    if mode == "lcm":
        assert (s == 0).all()
    else:
        j = torch.searchsorted(grid, s + K)
        assert ((s == 0) | (grid[j.clamp(max=len(grid) - 1)] == s + K)).all() and (s <= t_n).all()
    assert ((draw.w >= w_min) & (draw.w <= w_max)).all()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


# Tolerances, about 10x the fp32 noise measured over these cases (worst case): losses agree to 3e-6 (3e-5 allowed),
# gradients to 1e-4 of their norm (1e-3; per tensor 1e-2). An AdamW update is ~lr sign(g), so an element whose gradient
# is ~0 moves by an amount fp32 noise can change: updates agree to 3e-4 of their norm (1e-2; per tensor 0.1). The
# defects this is meant to catch (a wrong w embedding, unconditional prompt, guidance form, target time, EMA, clip,
# gradient scale, optimizer flag) show as relative errors of 1e-2 to O(1).
LOSS_RTOL, GRAD_RTOL, GRAD_TENSOR_RTOL, STEP_RTOL = 3e-5, 1e-3, 1e-2, 1e-2


def run_case(teacher: Path, shards: str, out: Path, monkeypatch: pytest.MonkeyPatch, *, family: str = "sd",
             variant: str = "full", **cfg_kw: Any) -> dict[str, Any]:
    """Two trainer steps and two oracle steps from the same inputs; assert they agree; return what was compared."""
    import tcdistill.trainer as trainer_mod
    from tcdistill.config import TrainConfig
    from tcdistill.schedule import TimestepDraw
    from tcdistill.tcd import TCDDraw

    base = dict(pretrained_teacher_model=str(teacher), output_dir=str(out), train_shards_path_or_url=shards, resolution=32,
                train_batch_size=4, max_train_steps=2, report_to="none", seed=0, mixed_precision="no", variant=variant,
                model_family=family, learning_rate=1e-3, adam_epsilon=1e-6, lora_rank=4, validation_steps=0, min_image_size=0,
                lr_warmup_steps=0)
    cfg = TrainConfig(**{**base, **cfg_kw})
    tr = trainer_mod.Trainer(cfg)
    oracle = Oracle(_pipeline(family, teacher), family, variant,
                    {**cfg_kw, "resolution": cfg.resolution})
    real_draw, real_encode, seen = trainer_mod.draw_tcd, trainer_mod.encode_latents, {"micro": []}

    def recorded_encode(*args: Any, **kw: Any) -> torch.Tensor:
        seen["micro"].append({"rng": torch.get_rng_state()})  # the VAE posterior sample draws from torch's RNG
        return real_encode(*args, **kw)

    def injected_draw(x0: torch.Tensor, grid: torch.Tensor, k: int, w_min: float, w_max: float, generator: Any = None,
                      mode: str = "tcd") -> TCDDraw:
        real = real_draw(x0, grid, k, w_min, w_max, generator=generator, mode=mode)
        _check_real_draw(real, grid, w_min, w_max, mode)
        assert k == K and mode == cfg.distill_mode
        i = len(seen["micro"]) - 1
        t, s, w = (torch.tensor(v) for v in MICRO_ROWS[i])
        if mode == "lcm":
            s = torch.zeros_like(t)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 + i))
        draw = TCDDraw(steps=TimestepDraw(t=t, t_n=(t - K).clamp(min=0), s=s), w=w.float(), eps=eps)
        seen["micro"][i].update(x0=x0.clone(), draw=draw)
        return draw

    monkeypatch.setattr(trainer_mod, "encode_latents", recorded_encode)
    monkeypatch.setattr(trainer_mod, "draw_tcd", injected_draw)

    strat = tr.strategy
    if variant == "full":
        student = oracle.full_student()
        sd_trainer = strat.student.state_dict()
        assert sd_trainer.keys() == student.state_dict().keys()
        for k_, v in student.state_dict().items():  # the trainer's student starts exactly where the spec's does
            assert torch.equal(sd_trainer[k_], v), k_
        target = copy.deepcopy(student).requires_grad_(False)
    else:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        student = oracle.lora_student(cfg.lora_rank, cfg.lora_alpha)
        lora_start = get_peft_model_state_dict(strat.student)
        assert lora_start.keys() == get_peft_model_state_dict(student).keys()  # same adapted layers as the reference
        set_peft_model_state_dict(student, lora_start)  # the random gaussian A: the trainer's, read back
        target = student  # LoRA: the online student under no_grad
        # One UNet in memory, not the reference's second frozen teacher copy (defect 11): the teacher is its base.
        from diffusers import UNet2DConditionModel

        held = {id(m) for o in (tr, strat, tr.family) for m in vars(o).values() if isinstance(m, UNet2DConditionModel)}
        assert held == {id(strat.student)}, held
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    trainer_params = dict(strat.student.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    start_t = {n: p.detach().clone() for n, p in target.named_parameters()} if variant == "full" else {}
    results = []
    accum = cfg.gradient_accumulation_steps
    for step in range(2):
        batches = [_batch(step * accum + m) for m in range(accum)]
        loss_tr, _, ok = tr.optimizer_step(iter(batches))
        assert ok
        opt.zero_grad()
        losses = []
        for m, batch in enumerate(batches):
            rec = seen["micro"][step * accum + m]
            torch.set_rng_state(rec["rng"])
            x0 = oracle.latents(batch["pixel_values"])
            torch.testing.assert_close(rec["x0"], x0, rtol=0, atol=0)
            cond, uncond = oracle.text(batch["captions"], batch)
            d = rec["draw"]
            micro_loss = oracle.loss(student, target, x0, cond, uncond, d.steps.t, d.steps.s, d.w, d.eps)
            (micro_loss / accum).backward()  # gradients of the mean over the micro-batches
            losses.append(micro_loss.detach())
        loss = torch.stack(losses).mean()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
        opt.step()
        if variant == "full":
            with torch.no_grad():
                for pt, ps in zip(target.parameters(), student.parameters(), strict=True):
                    pt.mul_(cfg.ema_decay).add_(ps, alpha=1 - cfg.ema_decay)

        stats = {"loss": loss.item(), "grad_norm": grad_norm, "loss_rel": abs(loss_tr / loss.item() - 1)}
        m_tr = {n: tr.optimizer.state[trainer_params[n]]["exp_avg"] for n in params}  # AdamW's first moment: (1 - beta1) g
        m_or = {n: opt.state[p]["exp_avg"] for n, p in params.items()}
        stats["grad_rel"] = rel(torch.cat([v.flatten() for v in m_tr.values()]), torch.cat([v.flatten() for v in m_or.values()]))
        stats["grad_tensor_rel"] = max((rel(m_tr[n], m_or[n]), n) for n in params)
        upd_tr = {n: trainer_params[n].detach() - start[n] for n in params}
        upd_or = {n: p.detach() - start[n] for n, p in params.items()}
        stats["step_rel"] = rel(torch.cat([v.flatten() for v in upd_tr.values()]),
                                torch.cat([v.flatten() for v in upd_or.values()]))
        stats["step_tensor_rel"] = max((rel(upd_tr[n], upd_or[n]), n) for n in params)
        if variant == "full":
            ema_tr = torch.cat([(p.detach() - start_t[n]).flatten() for n, p in strat.target.named_parameters()])
            ema_or = torch.cat([(p.detach() - start_t[n]).flatten() for n, p in target.named_parameters()])
            stats["ema_rel"] = rel(ema_tr, ema_or)
        print(f"step {step}:", stats)
        assert stats["loss_rel"] < LOSS_RTOL, (step, loss_tr, loss.item())
        assert stats["grad_rel"] < GRAD_RTOL and stats["grad_tensor_rel"][0] < GRAD_TENSOR_RTOL, stats
        assert stats["step_rel"] < STEP_RTOL and stats["step_tensor_rel"][0] < 10 * STEP_RTOL, stats
        if variant == "full":
            assert stats["ema_rel"] < STEP_RTOL, stats
        # Go on from the trainer's state, so the next step is compared from the same weights (AdamW amplifies the
        # noise of near-zero gradients into the weights, and the next step's loss would inherit it).
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(trainer_params[n])
                for key in ("exp_avg", "exp_avg_sq"):
                    opt.state[p][key].copy_(tr.optimizer.state[trainer_params[n]][key])
                start[n] = p.detach().clone()
            if variant == "full":
                for (n, pt), po in zip(strat.target.named_parameters(), target.parameters(), strict=True):
                    po.copy_(pt)
                    start_t[n] = po.detach().clone()
        results.append(stats)
    assert tr.global_step == 2
    # The conditioning, directly: prompts at the tokenizer's own length (16 here, so 77 would not even run), the empty
    # caption encoded as "" (diffusers' --proportion_empty_prompts), SD's unconditional prompt = the encoding of "",
    # SDXL's = zeros with the batch's own time ids.
    batch = _batch(0)
    cond, uncond = oracle.text(batch["captions"], batch)
    max_len = oracle.pipe.tokenizer.model_max_length
    assert max_len != 77 and cond["encoder_hidden_states"].shape[1] == max_len
    for got, want in ((tr.family.encode(batch, tr.device), cond), (tr.family.uncond(batch, tr.device), uncond)):
        torch.testing.assert_close(got["encoder_hidden_states"], want["encoder_hidden_states"], rtol=1e-6, atol=1e-6)
        if family == "sdxl":
            for key in ("text_embeds", "time_ids"):
                torch.testing.assert_close(got[key], want["added_cond_kwargs"][key], rtol=1e-6, atol=1e-6)
    return {"steps": results, "params": params}


# --------------------------------------------------------------------------------------------------------- cases
CASES = {
    "sd-full": dict(),
    "sd-lora": dict(variant="lora"),
    "vpred-full": dict(teacher="vpred"),
    "vpred-lora": dict(teacher="vpred", variant="lora"),
    # x0-predicting teacher; zero terminal SNR (v-prediction): the t = 999 rows have alpha_t = 0, z = eps, x0_hat = -v,
    # and the oracle's exponential-integrator TCF meets lambda_999 = -inf there (exp(-h) = 0: the DDIM jump all the same)
    "sample-lora": dict(teacher="sample", variant="lora"),
    "zero-snr-full": dict(teacher="zero_snr"),
    "sdxl-full": dict(teacher="sdxl", family="sdxl", w_min=3.0),
    "sdxl-lora": dict(teacher="sdxl", family="sdxl", variant="lora", w_min=3.0),
    # huber_c 0.05, not 0.001: the gradient d / sqrt(d^2 + c^2) amplifies fp32 noise in d by 1/c (2e-4 of the norm at 0.001)
    "sd-full-huber": dict(loss_type="huber", huber_c=0.05),
    # At the default factor 10, c_skip is < 1e-3 for every t >= 19: the boundary scalings hardly change the loss. At 0.01
    # they do (c_skip(19) = 0.87, c_skip(999) = 0.0025), so a wrong c_skip / c_out shows.
    "sd-full-lcm": dict(distill_mode="lcm", timestep_scaling_factor=0.01),
    "sd-lora-lcm-huber-clip": dict(variant="lora", distill_mode="lcm", loss_type="huber", huber_c=0.01, max_grad_norm=1e-3),
    "sd-full-unbatched-noskip": dict(batched_teacher=False, skip_identity_target=False),
    # two micro-batches per optimizer step; weight decay and beta1 large enough to show in the update;
    "sd-full-accum-adam": dict(gradient_accumulation_steps=2, adam_weight_decay=5.0, adam_beta1=0.5, ema_decay=0.8,
                               max_grad_norm=1e3),  # unclipped: a wrong gradient scale shows in AdamW's moments
    "sd-lora-accum": dict(variant="lora", gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_steps_match_the_oracle(case: str, teachers: dict[str, Path], shards: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(CASES[case])
    teacher = teachers[kw.pop("teacher", "sd")]
    if teacher == teachers["zero_snr"]:  # the case is what it says: alpha = 0 at t = 999, where the steps start rows
        from diffusers import DDPMScheduler

        assert DDPMScheduler.from_pretrained(teacher, subfolder="scheduler").alphas_cumprod[999] == 0
        assert 999 in STEPS[0][0] and 999 in STEPS[1][0]
    res = run_case(teacher, shards, tmp_path / "out", monkeypatch, **kw)
    losses = [r["loss"] for r in res["steps"]]
    assert all(loss > 0 for loss in losses)
    max_norm = kw.get("max_grad_norm", 1.0)
    if case.endswith("-clip"):  # the clip really acted
        assert all(r["grad_norm"] > max_norm for r in res["steps"])
    if max_norm > 100:  # and here it really did not
        assert all(r["grad_norm"] < max_norm for r in res["steps"])


def test_proportion_empty_prompts(tmp_path: Path) -> None:
    """--proportion_empty_prompts as in diffusers' scripts: each caption independently becomes "" with that probability
    (the empty caption is then encoded as "", checked above)."""
    from itertools import islice

    from tcdistill.data import DataConfig, build_train_dataloader
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    write_tiny_shards(tmp_path, n_shards=2, per_shard=25, image_size=16, seed=0)
    n = 400
    for p in (0.0, 0.3, 1.0):
        cfg = DataConfig(train_shards_path_or_url=shard_pattern(tmp_path, 2), resolution=16, train_batch_size=8, seed=0,
                         proportion_empty_prompts=p)
        caps = [c for b in islice(iter(build_train_dataloader(cfg)), n // 8) for c in b["captions"]]
        empty = sum(c == "" for c in caps) / len(caps)
        assert abs(empty - p) <= 4 * (p * (1 - p) / n) ** 0.5, (p, empty)  # Bernoulli(p) per caption (4 sigma)
