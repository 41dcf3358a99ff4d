import math

import pytest
import torch
from conftest import tiny_config, tiny_spec

from x3dnet import VARIANTS, X3D, ConfigError, create_model, derive_config, get_config
from x3dnet.profile import count_macs, count_params
from x3dnet.recipe import RECIPES

# Spec section 2, measured on the original: total params, params without BN affine, GMACs (conv +
# linear multiply-adds, FlopCounterMode / 2) at the training clip and at the 3-crop test clip.
PUBLISHED = {
    "x3d_xs": (3_794_322, 3_762_858, 0.6053, 0.8439),
    "x3d_s": (3_794_322, 3_762_858, 1.9629, 2.7270),
    "x3d_m": (3_794_322, 3_762_858, 4.7325, 6.1857),
    "x3d_l": (6_153_432, 6_087_120, 18.3677, 24.7776),
    # The spec's XL count (11,095,840) is pytorchvideo's, which lacks res2's shortcut BN (2 x 32).
    "x3d_xl": (11_095_840 + 64, 11_000_260, 35.8376, 48.4237),
}
# Spec section 3a: SlowFast state-dict entries (num_batches_tracked included).
ENTRIES = {"x3d_xs": 568, "x3d_s": 568, "x3d_m": 568, "x3d_l": 1146}
FACTORS = {"x3d_xs": (2.0, 2.2), "x3d_s": (2.0, 2.2), "x3d_m": (2.0, 2.2), "x3d_l": (2.0, 5.0), "x3d_xl": (2.9, 5.0)}


def test_the_tables_cover_every_variant():
    assert set(PUBLISHED) == set(VARIANTS) == set(RECIPES) == set(FACTORS)
    assert [n for n, c in VARIANTS.items() if c.derived] == ["x3d_xl"]


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_macs_match_the_published_table(name):
    config = VARIANTS[name]
    params, params_no_bn, gmacs_train, gmacs_test = PUBLISHED[name]
    with torch.device("meta"):
        model = X3D(config)
    assert count_params(model) == params
    assert count_params(model, batchnorm=False) == params_no_bn
    assert round(count_macs(config) / 1e9, 4) == gmacs_train
    test = RECIPES[name].test_crop
    assert round(count_macs(config, (config.frames, test, test)) / 1e9, 4) == gmacs_test
    if name in ENTRIES:
        assert len(model.state_dict()) == ENTRIES[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_expansion_rules_reproduce_the_hard_coded_sizes(name):
    config = VARIANTS[name]
    width, depth = FACTORS[name]
    derived = derive_config(name, width_factor=width, depth_factor=depth, frames=config.frames,
                            train_crop=config.train_crop)
    assert derived.architecture() == config.architecture()


@pytest.mark.parametrize("fixture", ["tiny_a", "tiny_b"])
def test_expansion_rules_reproduce_the_reference_tiny_models(fixture):
    spec = tiny_spec(fixture)
    config = tiny_config(fixture)
    assert config.stem_width == spec["conv1_dim"]
    assert list(config.depths) == spec["blocks_per_stage"]
    assert list(config.widths) == spec["stage_widths"]
    assert list(config.inner_widths) == spec["inner_widths"]
    assert list(config.se_widths) == spec["se_widths"]
    assert config.conv5_width == spec["conv5_dim"]
    assert list(config.head_window) == spec["head_pool_kernel"]
    model = X3D(config)
    assert count_params(model) == spec["params"]
    assert len(model.state_dict()) == spec["state_dict_entries"]
    for stage, (name, blocks) in zip(spec["stages"], [("res2", model.res2), ("res3", model.res3),
                                                      ("res4", model.res4), ("res5", model.res5)], strict=True):
        assert [i for i, b in enumerate(blocks) if b.se is not None] == stage["se_blocks"], name


# Spec section 1.5: conv5 map side at the training and 3-crop test sizes, and the head windows.
FEATURES = {"x3d_xs": (5, 6, 2), "x3d_s": (5, 6, 2), "x3d_m": (7, 8, 2), "x3d_l": (10, 12, 3)}


@pytest.mark.parametrize("name", FEATURES)
def test_head_windows_at_the_test_crop(name):
    config = VARIANTS[name]
    side_train, side_test, windows = FEATURES[name]
    with torch.device("meta"):
        model = X3D(config)
        for crop, side in ((config.train_crop, side_train), (RECIPES[name].test_crop, side_test)):
            features = model.forward_features(torch.empty(1, 3, config.frames, crop, crop))
            assert tuple(features.shape) == (1, config.conv5_width, config.frames, side, side)
    k = config.head_window[1]
    assert (side_train - k + 1, side_test - k + 1) == (1, windows)


@pytest.fixture(scope="module")
def tiny():
    """tiny_a's architecture (4 frames, 64 px, 10 classes) with random BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = X3D(VARIANTS["x3d_xs"].replace(
        name="tiny", frames=4, train_crop=64, stem_width=8, depths=(1, 1, 2, 1), widths=(8, 16, 32, 64),
        inner_widths=(18, 36, 72, 144), se_widths=(8, 8, 8, 16), head_width=32, num_classes=10))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, std=0.1)
            torch.nn.init.normal_(m.running_mean, std=0.1)
            torch.nn.init.uniform_(m.running_var, 0.5, 1.5)
    torch.nn.init.normal_(model.fc2.weight, std=1.0)  # confident predictions, as trained weights give
    return model.eval()


def test_one_window_gives_logits(tiny):
    x = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        features = tiny.forward_features(x)
        assert features.shape == (2, 144, 4, 2, 2)  # exactly one 4x2x2 head window
        torch.testing.assert_close(tiny(x), tiny.fc2(tiny.forward_head(features, pre_logits=True)))


@pytest.mark.parametrize("crop,side", [(96, 3), (128, 4)])  # 2x2 windows (XS/S/M at test), 3x3 (L at test)
def test_several_windows_give_the_log_of_the_mean_window_probabilities(tiny, crop, side):
    x = torch.randn(2, 3, 4, crop, crop)
    x[..., : crop // 2, : crop // 2] *= 4  # windows that see different things, so the two poolings differ
    with torch.no_grad():
        features = tiny.forward_features(x)
        assert features.shape[-2:] == (side, side)
        starts = range(side - 1)  # the 2x2 head window at stride 1
        windows = [features[..., i:i + 2, j:j + 2].mean((2, 3, 4)) for i in starts for j in starts]
        per_window = torch.stack([tiny.fc2(torch.relu(tiny.fc1(w))).softmax(1) for w in windows])
        out = tiny(x)
    torch.testing.assert_close(out.softmax(1), per_window.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2))  # already normalised log-probabilities
    pooled_logits = tiny.fc2(torch.relu(tiny.fc1(torch.stack(windows).mean(0))))
    # Averaging logits over windows instead of probabilities is off by 100x the tolerance above or more.
    assert (out.softmax(1) - pooled_logits.softmax(1)).abs().max() > 1e-4


def test_global_pooling_equals_window_pooling_at_the_training_crop_only(tiny):
    global_ = X3D(tiny.config.replace(head_pooling="global")).eval()
    global_.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        x = torch.randn(2, 3, 4, 64, 64)
        torch.testing.assert_close(global_(x), tiny(x))
        big = torch.randn(2, 3, 4, 96, 96)
        assert (global_(big).softmax(1) - tiny(big).softmax(1)).abs().max() > 1e-3


def test_input_smaller_than_the_head_window_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="input too small for tiny's head window.*at least 4 frames"):
        tiny(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="head window"):
        tiny(torch.randn(1, 3, 2, 64, 64))


def test_reset_classifier_and_pre_logits(tiny):
    model = X3D(tiny.config)
    model.reset_classifier(3)
    assert model.config.num_classes == 3 and model.fc2.weight.shape == (3, 32)
    assert model.fc2.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert model.fc2.bias.abs().max() == 0
    model.eval()
    x = torch.randn(2, 3, 4, 64, 64)
    assert model(x).shape == (2, 3)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)


def test_training_mode_runs_dropout_and_keeps_shapes(tiny):
    model = X3D(tiny.config.replace(dropout=0.9)).train()
    x = torch.randn(2, 3, 4, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and out.requires_grad
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_init_follows_the_original():
    model = X3D(VARIANTS["x3d_xs"])
    assert all(b.bn_c.weight.abs().max() == 0 for stage in (model.res2, model.res5) for b in stage)
    assert model.fc2.weight.std().item() == pytest.approx(0.01, rel=0.05)
    fan_out = model.conv5.weight.shape[0]  # 1x1x1 kernel
    assert model.conv5.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def test_names_and_aliases():
    assert get_config("X3D-M") == get_config("m") == get_config("x3d_m") == VARIANTS["x3d_m"]
    assert get_config("x3d_l", num_classes=10).num_classes == 10
    with pytest.raises(ConfigError, match="unknown model 'x3d_q'; choose one of x3d_xs, x3d_s"):
        get_config("x3d_q")
    with pytest.raises(ConfigError, match="head_pooling"):
        get_config("x3d_m", head_pooling="max")
    model = create_model("x3d_s", num_classes=7, head_pooling="global")
    assert model.config.num_classes == 7 and model.config.head_pooling == "global"
    assert model.training  # like every torch.nn module; callers choose eval()
