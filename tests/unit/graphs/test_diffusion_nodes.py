"""The image node kinds piece by piece, against the diffusers/transformers modules they split.

Covers: CLIP tokenize/encode vs ``encode_prompt``, the UNet cut at every block
boundary (odd sizes too), the VAE decoder cut into pieces, the denoising loop
driven by hand with items entering at different iterations (continuous
batching with per-item schedulers), ``image.save``, config checks and the
errors a user sees for a wrong or missing model.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("needs the CLIP vocabulary: pip install --no-deps open-clip-torch", allow_module_level=True)

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


@pytest.mark.parametrize("sched", ["dpm++", "euler"])
def test_items_at_different_timesteps_match_diffusers(pipe: Any, sched: str) -> None:
    """Items joining a running batch (different timesteps in one UNet call, per-item
    multistep scheduler state) each equal diffusers' latents for their seed."""
    import diffusers

    prompts = {3: "a cat", 5: "a dog", 7: "a photo of a lighthouse"}
    cfg = DenoiseConfig(model=TINY, scheduler=sched, num_inference_steps=4, height=32, width=32)
    pieces = [piece(Denoise, cfg, 0, 2, 5), piece(Denoise, cfg, 2, 4, 5), piece(Denoise, cfg, 4, 5, 5)]

    def x_of(new: list[ItemMeta]) -> dict[str, Any]:
        cond, uncond = pipe.encode_prompt([prompts[m.params["seed"]] for m in new], "cpu", 1, True, None)
        return {"embeds": cond, "uncond_embeds": uncond}

    calls: list[tuple[str, int, int]] = []
    set_step_callback(lambda rid, done, total: calls.append((rid, done, total)))
    try:
        got = drive(pieces, {0: metas([3]), 1: metas([5, 7])}, x_of)
    finally:
        set_step_callback(None)
    assert sorted(calls) == sorted((f"r{s}", i, 4) for s in prompts for i in range(1, 5))  # per-step progress hook
    base = pipe.scheduler.config
    pipe.scheduler = make_scheduler(TINY, sched)
    try:
        for seed, prompt in prompts.items():
            ref = pipe(prompt, num_inference_steps=4, height=32, width=32, generator=torch.Generator().manual_seed(seed),
                       output_type="latent").images[0]
            d = float((got[f"r{seed}"] - ref).abs().max())
            assert d < 1e-4, (seed, d)
    finally:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)


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
