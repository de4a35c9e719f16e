"""Vision towers (vit / timm / open_clip / siglip), layer selection, local weights, projector, layering."""

import ast
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from mmdlm.vision import build_projector, create_vision_tower

VIT = dict(kind="vit", image_size=32, patch_size=8, width=32, depth=3, heads=2, mlp_ratio=2.0)
OPEN_CLIP = dict(kind="open_clip", model_name="ViT-B-32", model_kwargs=dict(
    embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16, mlp_ratio=2.0),
    text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)))
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_vit_shapes_and_layer_selection(tmp_path, x):
    torch.manual_seed(0)
    full = create_vision_tower({**VIT, "select_layer": -1})
    assert full.num_patches == 16 and full.hidden_size == 32 and full.image_size == 32
    out_last = full(x)
    assert out_last.shape == (2, 16, 32)
    # the same weights with select_layer=-2: the last block is pruned away and its keys ignored on load
    ckpt = _save(full.vision_tower.state_dict(), tmp_path / "vit.safetensors")
    pen = create_vision_tower({**VIT, "select_layer": -2, "checkpoint_path": ckpt})
    assert len(pen.vision_tower.blocks) == 2
    out_pen = pen(x)
    assert not torch.allclose(out_pen, out_last)
    # independent reference: timm's own intermediate after block index 1 (= hidden_states[2] = layer -2 of 3)
    ref = full.vision_tower.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    assert torch.allclose(out_pen, ref, atol=1e-5)
    # config is JSON and rebuilds the same geometry
    again = create_vision_tower(json.loads(json.dumps(pen.config)))
    assert again.num_patches == pen.num_patches and torch.allclose(again(x), out_pen, atol=1e-5)


def test_vit_class_token_dropped_or_kept(x):
    torch.manual_seed(1)
    patch = create_vision_tower({**VIT, "class_token": True})
    both = create_vision_tower({**VIT, "class_token": True, "select_feature": "cls_patch"})
    both.vision_tower.load_state_dict(patch.vision_tower.state_dict())
    a, b = patch(x), both(x)
    assert a.shape == (2, 16, 32) and b.shape == (2, 17, 32) and both.num_patches == 17
    assert torch.allclose(a, b[:, 1:], atol=1e-6)


def test_every_vit_parameter_is_used(x):
    tower = create_vision_tower(VIT)
    tower(x).sum().backward()
    unused = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # pruned tail and classifier parts are gone, so DDP sees no unused parameters


def test_timm_model_loads_local_checkpoint(tmp_path, x):
    import timm

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()  # full model with head
    ckpt = _save(ref.state_dict(), tmp_path / "timm.safetensors")
    tower = create_vision_tower(dict(kind="timm", model_name="vit_tiny_patch16_224", image_size=32,
                                     checkpoint_path=ckpt)).eval()
    out = tower(x)
    assert out.shape == (2, 4, 192) and tower.num_patches == 4  # (32/16)^2 patches, class token dropped
    want = ref.forward_intermediates(x, indices=[-2], output_fmt="NLC", intermediates_only=True)[0]
    assert torch.allclose(out, want, atol=1e-5)
    torch.save(ref.state_dict(), tmp_path / "timm.pt")  # a torch file works too (weights_only)
    tower_pt = create_vision_tower(dict(kind="timm", model_name="vit_tiny_patch16_224", image_size=32,
                                        checkpoint_path=str(tmp_path / "timm.pt"))).eval()
    assert torch.allclose(tower_pt(x), want, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_vision_tower(dict(kind="timm", model_name="vit_tiny_patch16_224", checkpoint_path="/no/such.pt"))
    with pytest.raises(ValueError, match="unknown timm model"):
        create_vision_tower(dict(kind="timm", model_name="vit_tinyy_patch16_224"))


def test_timm_convnet_feature_stages():
    last = create_vision_tower(dict(kind="timm", model_name="resnet18", image_size=64, select_layer=-1))
    prev = create_vision_tower(dict(kind="timm", model_name="resnet18", image_size=64, select_layer=-2))
    assert (last.num_patches, last.hidden_size) == (4, 512)  # layer4: stride 32 -> 2x2
    assert (prev.num_patches, prev.hidden_size) == (16, 256)  # layer3: stride 16 -> 4x4
    assert prev(torch.randn(1, 3, 64, 64)).shape == (1, 16, 256)


def test_open_clip_tower(tmp_path, x):
    import open_clip

    clip = open_clip.create_model(OPEN_CLIP["model_name"], pretrained=None, **OPEN_CLIP["model_kwargs"]).eval()
    ckpt = _save(clip.state_dict(), tmp_path / "clip.safetensors")  # whole CLIP: visual.* + text keys
    tower = create_vision_tower({**OPEN_CLIP, "checkpoint_path": ckpt}).eval()
    out = tower(x)
    assert out.shape == (2, 16, 32) and tower.num_patches == 16
    ref = clip.visual.forward_intermediates(x, indices=[-2], output_fmt="NLC", intermediates_only=True)
    assert torch.allclose(out, ref["image_intermediates"][0], atol=1e-5)
    last = create_vision_tower({**OPEN_CLIP, "checkpoint_path": ckpt, "select_layer": -1}).eval()
    assert not torch.allclose(last(x), out)
    cls = create_vision_tower({**OPEN_CLIP, "checkpoint_path": ckpt, "select_feature": "cls_patch"}).eval()
    assert cls(x).shape == (2, 17, 32) and torch.allclose(cls(x)[:, 1:], out, atol=1e-6)
    assert tower.image_mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    with pytest.raises(FileNotFoundError):
        create_vision_tower({**OPEN_CLIP, "checkpoint_path": str(tmp_path / "missing.safetensors")})
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_vision_tower({**OPEN_CLIP, "model_name": "ViT-Q-99"})
    with pytest.raises(ValueError, match="downloaded"):
        create_vision_tower({**OPEN_CLIP, "model_name": "hf-hub:someone/some-clip"})


def test_siglip_tower_matches_hf_hidden_states(tmp_path, x):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    plain = _save(hf.state_dict(), tmp_path / "siglip.safetensors")  # transformers-5 keys: embeddings.*
    llava = _save({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in hf.state_dict().items()},
                  tmp_path / "llava.safetensors")  # LLaDA-V style prefix
    with torch.no_grad():
        hs = hf(x, output_hidden_states=True).hidden_states
    for ckpt in (plain, llava):
        tower = create_vision_tower(dict(kind="siglip", siglip_config=SIGLIP, checkpoint_path=ckpt)).eval()
        out = tower(x)
        assert out.shape == (2, 16, 32) and tower.num_patches == 16
        assert torch.allclose(out, hs[-2], atol=1e-5) and not torch.allclose(out, hs[-1], atol=1e-3)
    keys = list(tower.state_dict())
    assert all(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(".encoder.layers.2." in k for k in keys)  # the last layer is deleted, as LLaDA-V does
    assert "vision_tower.vision_model.post_layernorm.weight" in keys
    last = create_vision_tower(dict(kind="siglip", siglip_config=SIGLIP, checkpoint_path=plain,
                                    select_layer=-1)).eval()
    assert torch.allclose(last(x), hs[-1], atol=1e-5)
    with pytest.raises(FileNotFoundError):
        create_vision_tower(dict(kind="siglip", siglip_config=SIGLIP, checkpoint_path=str(tmp_path / "nope.pt")))


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    other = create_vision_tower({**VIT, "width": 48, "heads": 2})
    ckpt = _save(other.vision_tower.state_dict(), tmp_path / "w48.safetensors")
    with pytest.raises(ValueError, match="wrong shape"):
        create_vision_tower({**VIT, "checkpoint_path": ckpt})
    ckpt = _save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(ValueError, match="missing"):
        create_vision_tower({**VIT, "checkpoint_path": ckpt})


def test_pool_grid_averages_patches_into_coarser_cells(x):
    full = create_vision_tower({**VIT, "select_layer": -1})
    pooled = create_vision_tower({**VIT, "select_layer": -1, "pool_grid": 2})
    pooled.load_state_dict(full.state_dict())
    assert pooled.num_patches == 4 and full.num_patches == 16
    f = full(x).reshape(2, 4, 4, -1)  # 32 px / patch 8: a 4x4 grid, row-major
    top_left = f[:, :2, :2].mean(dim=(1, 2))
    bottom_right = f[:, 2:, 2:].mean(dim=(1, 2))
    out = pooled(x)
    torch.testing.assert_close(out[:, 0], top_left)
    torch.testing.assert_close(out[:, 3], bottom_right)
    # A GroupNorm ResNet pooled to the Shapes world's 3x3 grid: an 8x8 stride-8 map -> 9 slots.
    cnn = create_vision_tower(dict(kind="timm", model_name="resnet18", image_size=64, select_layer=2, pool_grid=3,
                                   model_kwargs=dict(layers=[1, 1, 1, 1], channels=[32, 64, 64, 64], stem_width=32,
                                                     norm_layer="groupnorm")))
    assert cnn(torch.randn(2, 3, 64, 64)).shape == (2, 9, 64)


def test_pool_type_max_keeps_each_channels_peak(x):
    full = create_vision_tower({**VIT, "select_layer": -1})
    pooled = create_vision_tower({**VIT, "select_layer": -1, "pool_grid": 2, "pool_type": "max"})
    pooled.load_state_dict(full.state_dict())
    f = full(x).reshape(2, 4, 4, -1)
    out = pooled(x)
    torch.testing.assert_close(out[:, 1], f[:, :2, 2:].amax(dim=(1, 2)))  # top right cell
    assert not torch.allclose(out[:, 1], f[:, :2, 2:].mean(dim=(1, 2)))


def test_pool_grid_errors_say_what_to_change():
    with pytest.raises(ValueError, match="finer than"):
        create_vision_tower({**VIT, "pool_grid": 5})
    with pytest.raises(ValueError, match="positive int"):
        create_vision_tower({**VIT, "pool_grid": 0})
    with pytest.raises(ValueError, match="square grid"):
        create_vision_tower({**VIT, "class_token": True, "select_feature": "cls_patch", "pool_grid": 2})
    with pytest.raises(ValueError, match="pool_type must be 'avg' or 'max'"):
        create_vision_tower({**VIT, "pool_grid": 2, "pool_type": "median"})
    with pytest.raises(ValueError, match="pool_type must be"):
        create_vision_tower({**VIT, "pool_type": "mean"})


def test_bad_configs_raise_clear_errors(x):
    with pytest.raises(ValueError, match="valid kinds"):
        create_vision_tower({"kind": "clip"})
    with pytest.raises(ValueError, match="unknown keys"):
        create_vision_tower({**VIT, "widht": 32})
    with pytest.raises(ValueError, match="out of range"):
        create_vision_tower({**VIT, "select_layer": -5})
    with pytest.raises(ValueError, match="select_feature"):
        create_vision_tower({**VIT, "select_feature": "cls"})
    with pytest.raises(ValueError, match="siglip_config"):
        create_vision_tower({"kind": "siglip"})
    with pytest.raises(ValueError, match="32x32"):
        create_vision_tower(VIT)(torch.randn(1, 3, 64, 64))


def test_vq_tower_reads_the_image_tokenizer_codes():
    from mmdlm.vision.image_tokenizer import VQConfig, VQImageTokenizer

    vq_config = dict(image_size=32, base_channels=8, channel_mult=[1, 2], embed_dim=4, codebook_size=16)
    vq = VQImageTokenizer(VQConfig(**vq_config))
    torch.manual_seed(0)
    with torch.no_grad():
        vq.embedding.normal_()  # a codebook whose codes differ, as after training
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tower = create_vision_tower({"kind": "vq", "vq": vq_config, "width": 24, "pool": 2})
    assert (tower.num_patches, tower.hidden_size, tower.image_size) == (16, 24, 32)  # 8x8 codes, pooled 2x2
    tower.load_image_tokenizer(vq)
    normalised = (pixels - 0.5) / 0.5  # what MMDLMImageProcessor gives with the tower's mean/std
    assert torch.equal(tower.vision_tower.codes(normalised), vq.encode(pixels))
    feats = tower(normalised)
    codes = vq.encode(pixels)
    expected = tower.vision_tower.code_embed(codes).permute(0, 3, 1, 2)
    expected = torch.nn.functional.avg_pool2d(expected, 2).flatten(2).transpose(1, 2) + tower.vision_tower.pos_embed
    assert feats.shape == (3, 16, 24) and torch.allclose(feats, expected)
    # Only the code embeddings learn; the encoder copy is frozen (the image tokenizer's stage trains it).
    feats.sum().backward()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {"vision_tower.code_embed.weight", "vision_tower.pos_embed"}
    assert tower.vision_tower.code_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs 'vq'"):
        create_vision_tower({"kind": "vq"})
    with pytest.raises(ValueError, match="pool=3"):
        create_vision_tower({"kind": "vq", "vq": vq_config, "pool": 3})
    with pytest.raises(ValueError, match="only a 'vq' vision tower"):
        create_vision_tower(VIT).load_image_tokenizer(vq)


def test_projector_names_and_shapes():
    lin = build_projector("linear", 24, 40)
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (40, 24)
    mlp = build_projector("mlp2x_gelu", 24, 40)
    shapes = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert shapes == {"0.weight": (40, 24), "0.bias": (40,), "2.weight": (40, 40), "2.bias": (40,)}
    assert isinstance(mlp[1], torch.nn.GELU)
    assert build_projector("mlp3x_gelu", 8, 16)(torch.randn(2, 5, 8)).shape == (2, 5, 16)
    assert [k for k in build_projector("mlp3x_gelu", 8, 16).state_dict() if k.endswith("weight")] == \
        ["0.weight", "2.weight", "4.weight"]
    ident = build_projector("identity", 8, 8)
    t = torch.randn(3, 8)
    assert torch.equal(ident(t), t)
    with pytest.raises(ValueError, match="mm_hidden_size == hidden_size"):
        build_projector("identity", 8, 16)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        build_projector("mlp2x_relu", 8, 16)


def test_vision_layer_imports_nothing_above_it():
    root = pathlib.Path(__file__).resolve().parents[1] / "mmdlm" / "vision"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from a parent package"
                assert node.level == 1 or not (node.module or "").startswith("mmdlm"), path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("mmdlm") for a in node.names), path.name
        for node in tree.body:  # open_clip only inside the branch that needs it
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("open_clip") for n in names), path.name


def test_convnet_tower_builds_on_meta_device():
    # Checkpoint loading builds the model on "meta" first; a timm convnet's output shape is probed there.
    cfg = dict(kind="timm", model_name="resnet18", image_size=64, select_layer=2, pool_grid=3,
               model_kwargs=dict(layers=[1, 1, 1, 1], channels=[32, 64, 64, 64], stem_width=32, norm_layer="groupnorm"))
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):  # as mmdlm.checkpoints builds a model before loading
        tower = create_vision_tower(cfg)
    assert (tower.num_patches, tower.hidden_size) == (9, 64)
    assert next(tower.parameters()).device.type == "meta"
