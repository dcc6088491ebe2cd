"""The image node kinds piece by piece, against the diffusers/transformers modules they split.

Covers: CLIP tokenize/encode vs ``encode_prompt``, the UNet cut at every block
boundary (odd sizes too), the VAE decoder cut into pieces, the denoising loop
driven by hand with items entering at different iterations (continuous
batching with per-item schedulers), ``image.save``, config checks and the
errors a user sees for a wrong or missing model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mmpipe.graphs.base import ItemMeta, UserError  # noqa: E402
from mmpipe.graphs.diffusion import Denoise, DenoiseConfig, Seeds, SeedsConfig, VaeConfig, VaeDecode, set_step_callback  # noqa: E402
from mmpipe.graphs.diffusion_load import SDModel, make_scheduler  # noqa: E402
from mmpipe.graphs.diffusion_models import ensure_model  # noqa: E402
from mmpipe.graphs.diffusion_unet import UNetPiece, flat, items, unet_cost_estimate  # noqa: E402
from mmpipe.graphs.image import Save, SaveConfig  # noqa: E402
from mmpipe.graphs.text import Encode, EncodeConfig, Prompts, PromptsConfig, Tokenize, TokenizeConfig  # noqa: E402

TINY = SDModel(path="builtin:tiny_random", vae_scale=2)


@pytest.fixture(scope="module")
def pipe() -> Any:
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(ensure_model("tiny_random")), safety_checker=None)
    p.set_progress_bar_config(disable=True)
    return p


def piece(cls: type, cfg: Any, lo: int, hi: int, n: int) -> Any:
    inst = cls(cfg, range(lo, hi), n)
    inst.seed = 0
    inst.setup("cpu", torch.float32)
    return inst


def metas(seeds: list[int]) -> list[ItemMeta]:
    return [ItemMeta(f"r{s}", params={"seed": s}) for s in seeds]


# ---------------------------------------------------------------------- text
def test_tokenize_matches_clip_and_warns_on_truncation(caplog: pytest.LogCaptureFixture) -> None:
    tok = piece(Tokenize, TokenizeConfig(model=TINY), 0, 1, 1)
    out = tok.forward({"prompt": ["a photo of a cat", "word " * 100], "negative_prompt": ["blurry", ""]}, metas([0, 1]))
    assert out["ids"].shape == (2, 77) and out["uncond_ids"].shape == (2, 77)
    assert out["ids"][0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert out["ids"][0, 7:].eq(49407).all()  # padded with <|endoftext|>
    assert out["ids"][1, -1] == 49407  # truncated, still ends with EOS
    assert out["uncond_ids"][1, :2].tolist() == [49406, 49407]
    assert any("r1" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_encode_matches_encode_prompt(pipe: Any) -> None:
    tok = piece(Tokenize, TokenizeConfig(model=TINY), 0, 1, 1)
    enc = piece(Encode, EncodeConfig(model=TINY), 0, 1, 1)
    prompts, negs = ["a photo of a cat", "a dog"], ["", "ugly"]
    out = enc.forward(tok.forward({"prompt": prompts, "negative_prompt": negs}, metas([0, 1])), metas([0, 1]))
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negs)
    assert torch.allclose(out["embeds"], cond, atol=1e-6) and torch.allclose(out["uncond_embeds"], uncond, atol=1e-6)


# ---------------------------------------------------------------------- UNet pieces
@pytest.mark.parametrize("hw", [16, 9], ids=["even", "odd"])
def test_unet_pieces_equal_the_whole_unet(pipe: Any, hw: int) -> None:
    """Every cut of the 5 parts (down, down, mid, up, up) gives unet(...) exactly."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, hw, hw, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 10])
    with torch.inference_mode():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        for cuts in ([0, 5], [0, 2, 5], [0, 1, 3, 5], [0, 1, 2, 3, 4, 5]):
            pieces = [UNetPiece(unet, range(a, b), "cpu") for a, b in zip(cuts, cuts[1:])]
            h, emb = pieces[0].embed(x, t, 1)
            res: tuple = (h,)
            for p in pieces:
                h, res = p.run(h, emb, res, ctx)
                # what travels between pieces survives the [B, k, ...] carry layout
                h, res = flat(items(h, 2)), tuple(flat(items(r, 2)) for r in res)
            assert not res
            assert torch.equal(pieces[-1].out(h, t), ref), cuts


def test_cost_estimate_has_one_cost_per_part() -> None:
    costs = unet_cost_estimate([128, 256, 512], [False, True, True], 2, 32)
    assert len(costs) == 7 and abs(sum(costs) - 1) < 1e-3 and min(costs) > 0
    cfg = DenoiseConfig(model=TINY, height=64, width=64)
    assert len(Denoise.part_costs(cfg)) == Denoise.num_parts(cfg) == 5


# ---------------------------------------------------------------------- the loop
def drive(pieces: list[Any], joins: dict[int, list[ItemMeta]], x_of: Any) -> dict[str, Any]:
    """Run a split loop by hand: ``joins[it]`` enter at iteration ``it`` and are
    batched with the items already looping (continuous batching)."""
    lanes: list[dict[str, dict]] = [{} for _ in pieces]
    carry, live, out, it = None, [], {}, 0
    while joins or live:
        new = joins.pop(it, [])
        if new:
            x = x_of(new)
            for p, ls in zip(pieces, lanes):
                for m in new:
                    ls[m.key] = {}
                p.enter(x, new, [ls[m.key] for m in new])
            fresh = pieces[0].begin(x, new)
            carry = fresh if carry is None else pieces[0].concat([carry, fresh])
            live = live + new
        for p, ls in zip(pieces, lanes):
            carry = p.step(carry, live, [ls[m.key] for m in live])
        carry, done, outs = pieces[-1].end(carry, live, [lanes[-1][m.key] for m in live])
        keep = [i for i, d in enumerate(done) if not d]
        out.update({live[i].key: outs["latents"][i] for i, d in enumerate(done) if d})
        for p, ls in zip(pieces, lanes):
            p.finish([ls.pop(live[i].key) for i, d in enumerate(done) if d])
        carry = pieces[0].select(carry, keep) if keep else None
        live = [live[i] for i in keep]
        it += 1
    return out


PROMPTS = {3: "a cat", 5: "a dog", 7: "a photo of a lighthouse"}


def x_of(pipe: Any, new: list[ItemMeta]) -> dict[str, Any]:
    """The loop's inputs for these items (prompt chosen by seed), as diffusers encodes them."""
    cond, uncond = pipe.encode_prompt([PROMPTS[m.params["seed"]] for m in new], "cpu", 1, True, None)
    return {"embeds": cond, "uncond_embeds": uncond}


def assert_like_diffusers(pipe: Any, sched: str, got: dict[str, Any], steps: dict[int, int] | None = None) -> None:
    """Each item's latents equal diffusers' for its seed alone (``steps``: per seed, default 4)."""
    import diffusers

    base = pipe.scheduler.config
    pipe.scheduler = make_scheduler(TINY, sched)
    try:
        for key, lat in got.items():
            seed = int(key[1:])
            ref = pipe(PROMPTS[seed], num_inference_steps=(steps or {}).get(seed, 4), height=32, width=32,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images[0]
            d = float((lat - ref).abs().max())
            assert d < 1e-4, (key, d)
    finally:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)


@pytest.mark.parametrize("sched", ["dpm++", "euler", "ddpm", "euler_a", "unipc", "pndm"])
def test_items_at_different_timesteps_match_diffusers(pipe: Any, sched: str) -> None:
    """Items joining a running batch (different timesteps in one UNet call, multistep
    scheduler state, step noise from each item's generator) each equal diffusers'
    latents for their seed; items that entered together step their scheduler once."""
    from mmpipe.graphs import diffusion_loop

    cfg = DenoiseConfig(model=TINY, scheduler=sched, num_inference_steps=4, height=32, width=32)
    pieces = [piece(Denoise, cfg, 0, 2, 5), piece(Denoise, cfg, 2, 4, 5), piece(Denoise, cfg, 4, 5, 5)]
    calls: list[tuple[str, int, int]] = []
    steps: list[int] = []
    real = diffusion_loop.Cohort.step

    def counted(self: Any, noise: Any, *a: Any) -> Any:
        steps.append(noise.shape[0])
        return real(self, noise, *a)

    set_step_callback(lambda rid, done, total: calls.append((rid, done, total)))
    diffusion_loop.Cohort.step = counted  # type: ignore[method-assign]
    try:
        got = drive(pieces, {0: metas([3]), 1: metas([5, 7])}, lambda new: x_of(pipe, new))
    finally:
        diffusion_loop.Cohort.step = real  # type: ignore[method-assign]
        set_step_callback(None)
    sch = make_scheduler(TINY, sched)
    sch.set_timesteps(4)
    n = len(sch.timesteps)  # scheduler steps (PNDM's Runge-Kutta warm-up makes more than 4)
    assert sorted(calls) == sorted((f"r{s}", i, n) for s in PROMPTS for i in range(1, n + 1))  # per-step progress hook
    assert steps == [1] + [1, 2] * (n - 1) + [2]  # r3 alone; r5 and r7 (entered together) in one batched step
    assert_like_diffusers(pipe, sched, got)


@pytest.mark.parametrize("sched", ["dpm++", "ddpm"])
def test_cohort_survives_members_leaving_reordering_and_splitting(pipe: Any, sched: str) -> None:
    """Three items enter together (one cohort); one leaves after a step (its request
    failed elsewhere), the other two come back in reversed order, then in separate
    groups: each still equals diffusers (multistep state and generators follow the rows)."""
    cfg = DenoiseConfig(model=TINY, scheduler=sched, num_inference_steps=4, height=32, width=32)
    pieces = [piece(Denoise, cfg, 0, 3, 5), piece(Denoise, cfg, 3, 5, 5)]
    r3, r5, r7 = ms = metas([3, 5, 7])
    lanes: list[dict[str, dict]] = [{m.key: {} for m in ms} for _ in pieces]
    x = x_of(pipe, ms)
    for p, ls in zip(pieces, lanes):
        p.enter(x, ms, [ls[m.key] for m in ms])

    def once(carry: Any, group: list[ItemMeta]) -> tuple[Any, list[bool], Any]:
        for p, ls in zip(pieces, lanes):
            carry = p.step(carry, group, [ls[m.key] for m in group])
        return pieces[-1].end(carry, group, [lanes[-1][m.key] for m in group])

    carry, done, _ = once(pieces[0].begin(x, ms), ms)
    for p, ls in zip(pieces, lanes):
        p.finish([ls.pop(r5.key)])
    carry, done, _ = once(pieces[0].select(carry, [2, 0]), [r7, r3])
    assert done == [False, False]
    apart = {r7.key: pieces[0].select(carry, [0]), r3.key: pieces[0].select(carry, [1])}
    got: dict[str, Any] = {}
    for _ in range(2):
        for m in (r7, r3):
            apart[m.key], done, outs = once(apart[m.key], [m])
            if done[0]:
                got[m.key] = outs["latents"][0]
    assert lanes[-1][r3.key]["cohort"] is not lanes[-1][r7.key]["cohort"]
    assert sorted(got) == ["r3", "r7"]
    assert_like_diffusers(pipe, sched, got)


def test_items_with_different_schedules_never_share_a_cohort(pipe: Any) -> None:
    """Items entering together with different step counts (a per-request parameter) get
    cohorts of their own, and each follows its own schedule."""

    class PerRequestSteps(Denoise):
        request_params = ("num_inference_steps",)

    cfg = DenoiseConfig(model=TINY, scheduler="dpm++", num_inference_steps=4, height=32, width=32)
    pieces = [piece(PerRequestSteps, cfg, 0, 2, 5), piece(PerRequestSteps, cfg, 2, 5, 5)]
    ms = [ItemMeta("r3", params={"seed": 3, "num_inference_steps": 2}), ItemMeta("r5", params={"seed": 5}),
          ItemMeta("r7", params={"seed": 7, "num_inference_steps": 2})]
    got = drive(pieces, {0: ms}, lambda new: x_of(pipe, new))
    assert_like_diffusers(pipe, "dpm++", got, steps={3: 2, 7: 2})


def test_scheduler_names() -> None:
    assert type(make_scheduler(TINY, "euler")).__name__ == "EulerDiscreteScheduler"
    dpm = make_scheduler(TINY, "dpm++")
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler" and dpm.config.algorithm_type == "dpmsolver++"
    assert type(make_scheduler(TINY, "default")).__name__ == "DDIMScheduler"
    assert type(make_scheduler(TINY, "UniPCMultistepScheduler")).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(UserError, match="no scheduler"):
        make_scheduler(TINY, "NopeScheduler")


# ---------------------------------------------------------------------- VAE and save
@pytest.mark.parametrize("split", [[0, 3], [0, 1, 3], [0, 1, 2, 3]])
def test_vae_pieces_equal_decode(pipe: Any, split: list[int]) -> None:
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = VaeConfig(model=TINY, height=32, width=32)
    x: dict[str, Any] = {"latents": lat}
    for a, b in zip(split, split[1:]):
        x = piece(VaeDecode, cfg, a, b, 3).forward(x, metas([0, 1]))
    with torch.inference_mode():
        ref = pipe.image_processor.postprocess(pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample, output_type="pt")
    assert torch.equal(x["image"], ref)


def test_save_writes_pngs_like_diffusers(pipe: Any, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    save = Save(SaveConfig(), range(0, 1), 1)
    save.output_dir = str(tmp_path / "out")
    out = save.forward({"image": img}, [ItemMeta("a"), ItemMeta("b", sub=1, of=2)])
    assert [Path(p).name for p in out["path"]] == ["a.png", "b-1.png"]
    ref = pipe.image_processor.numpy_to_pil(img.permute(0, 2, 3, 1).numpy())
    for p, r in zip(out["path"], ref):
        assert (np.asarray(Image.open(p)) == np.asarray(r)).all()


# ---------------------------------------------------------------------- checks and errors
def test_config_checks() -> None:
    bad = dict((k, m) for k, m, _ in Denoise.check(DenoiseConfig(model=TINY, scheduler="eulr", height=33, num_inference_steps=0)))
    assert set(bad) == {"scheduler", "height", "num_inference_steps"}
    assert Denoise.check(DenoiseConfig(model=TINY, scheduler="KDPM2DiscreteScheduler")) == []
    assert Prompts.check(PromptsConfig()) and Prompts.check(PromptsConfig(prompt="x", num_images_per_prompt=0))
    reqs = Prompts.requests(PromptsConfig(prompt="a cat", num_images_per_prompt=3, seed=5))
    assert [r.params["seed"] for r in reqs] == [5, 6, 7] and [r.id for r in reqs] == ["0000", "0001", "0002"]
    assert [r.params["seed"] for r in Seeds.requests(SeedsConfig(count=2, seed=9))] == [9, 10]
    assert Save.check(SaveConfig(format="gif"))


def test_wrong_or_missing_model_is_a_user_error(tmp_path: Path) -> None:
    wrong = SDModel(path="builtin:tiny_random", vae_scale=2, unet_down_blocks=3, unet_up_blocks=3)
    with pytest.raises(UserError) as e:
        piece(Denoise, DenoiseConfig(model=wrong), 0, 7, 7)
    assert e.value.key == "model.unet_down_blocks" and "unet_down_blocks=2" in e.value.fix
    with pytest.raises(UserError) as e:
        piece(Denoise, DenoiseConfig(model=SDModel(path="builtin:tiny_random", vae_scale=8)), 0, 5, 5)
    assert e.value.key == "model.vae_scale"
    with pytest.raises(UserError, match="does not exist"):
        piece(Encode, EncodeConfig(model=SDModel(path=str(tmp_path / "nothing"))), 0, 1, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        piece(Encode, EncodeConfig(model=SDModel(path=str(tmp_path / "empty"))), 0, 1, 1)
