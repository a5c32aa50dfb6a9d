"""Bad and edge inputs for every public entry point (issue 18): hypothesis strategies over dtypes,
devices, shapes (empty, one token, mismatched, GQA-like), strides (transposed, stride 0,
overlapping, non-unit feature stride), non-finite values, argument types and ranges.

Every outcome must be one of: a clear error (``ValueError`` / ``TypeError``) naming a bad argument
and what is accepted; an exact dense result; or the reference result (the float64 masked
reference on the selection the call made, NaN exactly where it has NaN). Shapes are tiny; the
cheap error-only properties run more examples than the profile's default.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability_helpers import INF, NAN, assert_same_nonfinite_and_close, masked_reference, reference_top_k
from test_nn import reference_module
import sparse_inductor as si
from sparse_inductor import CumulativeMass, Full, PerHead, Skip, Stripe, Temporal, TopK, Window
from sparse_inductor.reference import reference_query_keep, tile_ids

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: Error-only properties are cheap: run several times the profile's examples.
MANY = settings(max_examples=4 * settings.default.max_examples)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class Bad:
    """Expected failures of one call: ``{argument: words the message must contain}``."""

    def __init__(self):
        self.reasons = []

    def add(self, name, *words):
        self.reasons.append((name, words))

    def __bool__(self):
        return bool(self.reasons)

    def names(self):
        return {name for name, _ in self.reasons}

    def check(self, error):
        message = str(error)
        named = [name for name, words in self.reasons if all(w in message for w in (name, *words))]
        assert named, f"the error {message!r} names none of the bad arguments {self.reasons}"


def make_tensor(shape, dtype, device, layout, generator):
    """``[B, H, N, D]`` values in ``layout``: contiguous, a ``[B, N, H, D]`` transpose, batch stride
    0, overlapping rows (token stride 1), or feature stride 2."""
    real = dtype if dtype.is_floating_point else torch.float32

    def rand(*s):
        return torch.randn(*s, generator=generator).to(real)

    if len(shape) != 4:
        layout = "contiguous"
    else:
        B, H, N, D = shape
    if layout == "contiguous":
        x = rand(*shape)
    elif layout == "transposed":
        x = rand(B, N, H, D).transpose(1, 2)
    elif layout == "stride0":
        x = rand(1, H, N, D).expand(B, H, N, D)
    elif layout == "overlapping":
        base = rand(max(B * H * (N + D), 1))
        x = base.as_strided((B, H, N, D), (H * (N + D), N + D, 1, 1))
    else:  # feature stride 2
        x = rand(B, H, N, 2 * D)[..., ::2]
    if not dtype.is_floating_point:
        x = (x > 0).to(dtype) if dtype == torch.bool else x.to(dtype)
    return x.to(device)


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
GRIDS = [(1, 1, 1), (1, 4, 4), (2, 3, 5), (2, 4, 8)]
TILES = [(4, 4, 4), (1, 2, 2), (2, 3, 5), (1, 1, 1)]
LAYOUTS = ["contiguous", "transposed", "stride0", "overlapping", "feature_stride2"]
POLICIES = [None, None, TopK(0.5), CumulativeMass(0.9, 1, 0.5), Window(0, 1, 1), Temporal(0, 0),
            Stripe(first_frames=1), Full(), Skip(), TopK(0.0) | Window(0, 0, 0)]


@st.composite
def attention_calls(draw, bad_arguments: bool):
    """Arguments of a ``video_sparse_attention`` call; with ``bad_arguments`` at least one is wrong
    (and the tensors stay tiny), else all are valid, the tensors of any strides and values."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    bad = Bad()
    device = draw(st.sampled_from(DEVICES))
    dtype = draw(st.sampled_from(FLOATS if device == "cpu" else FLOATS[:3]))  # float64: CPU only
    B, H = draw(st.sampled_from([1, 2, 0])), draw(st.sampled_from([1, 2, 0]))
    grid, tile = draw(st.sampled_from(GRIDS)), draw(st.sampled_from(TILES))
    D = draw(st.sampled_from([1, 8, 16]))
    N = math.prod(grid)
    layout = draw(st.sampled_from(LAYOUTS))
    sparsity, policy = draw(st.sampled_from([0.0, 0.5, 0.875])), draw(st.sampled_from(POLICIES))
    query_keep, scale = draw(st.sampled_from([1.0, 1.0, 0.5])), draw(st.sampled_from([None, 0.3]))
    shapes = {"q": (B, H, N, D), "k": (B, H, N, D), "v": (B, H, N, D)}
    dtypes = {"q": dtype, "k": dtype, "v": dtype}
    devices = {"q": device, "k": device, "v": device}
    not_tensor = None
    if bad_arguments:
        for _ in range(draw(st.integers(1, 2))):
            what = draw(st.sampled_from(["dtype", "mixed dtype", "device", "dims", "gqa", "value dim", "head dim",
                                         "tokens", "not a tensor", "sparsity", "tile", "grid", "scale", "policy",
                                         "query_keep"]))
            name = draw(st.sampled_from(["q", "k", "v"]))
            if what == "dtype":
                bad_dtype = draw(st.sampled_from([torch.int32, torch.bool, torch.complex64]
                                                 + ([torch.float64] if device == "cuda" else [])))
                dtypes = dict.fromkeys(dtypes, bad_dtype)
                bad.add("dtype", "torch.float16")
            elif what == "mixed dtype":
                dtypes[name] = torch.float16 if dtype != torch.float16 else torch.float32
                bad.add(name, "one dtype")
                bad.add("dtype", "accepted dtypes")  # a mixed set can also hit an unaccepted dtype first
            elif what == "device":
                devices = dict.fromkeys(devices, "meta")
                bad.add("device", "'cpu' and 'cuda'")
            elif what == "dims":
                shapes[name] = shapes[name][1:]
                bad.add(name, "4 dims")
            elif what == "gqa":  # fewer key/value heads than query heads (enable_gqa-style)
                shapes["k"] = shapes["v"] = (B, H + 1, N, D)
                bad.add("k", "same [B, H, N, D]")
            elif what == "value dim":
                shapes["v"] = (B, H, N, D + 1)
                bad.add("v", "same [B, H, N, D]")
            elif what == "head dim":
                shapes = {n: (B, H, N, 257) for n in shapes}
                bad.add("head dim", "256")
            elif what == "tokens":
                shapes = {n: (B, H, N + 1, D) for n in shapes}
                bad.add("grid", "T*H*W")
            elif what == "not a tensor":
                not_tensor = name
                bad.add(name, "torch.Tensor")
            elif what == "sparsity":
                sparsity, policy = draw(st.sampled_from([1.0, -0.1, "0.5", True, NAN, None])), None
                bad.add("sparsity", "[0, 1)")
            elif what == "tile":
                tile = draw(st.sampled_from([(0, 2, 2), (4, 4), (8, 8, 8), (2.0, 2, 2), "444"]))
                bad.add("tile", "three positive ints" if tile != (8, 8, 8) else "256")
            elif what == "grid":
                grid = draw(st.sampled_from([(0, 4, 4), (4, 4), (1.5, 2, 2), None, (True, 4, 4)]))
                bad.add("grid", "three positive ints")
            elif what == "scale":
                scale = draw(st.sampled_from([0.0, -1.0, INF, NAN, "x", True]))
                bad.add("scale", "positive finite")
            elif what == "policy":
                policy = draw(st.sampled_from(["topk", 0.5, PerHead([TopK(0.5)] * 3)]))
                bad.add("policy", "TopK" if not isinstance(policy, PerHead) else "heads")
            elif what == "query_keep":
                query_keep = draw(st.sampled_from([0.0, 1.5, -1.0, "half", NAN]))
                bad.add("query_keep", "(0, 1]")
    tensors = {}
    for name in ("q", "k", "v"):
        tensors[name] = [1, 2] if name == not_tensor else make_tensor(shapes[name], dtypes[name], devices[name],
                                                                        layout, g)
    poison = None if bad_arguments else draw(st.sampled_from([None, None, NAN, INF, -INF]))
    if poison is not None and B * H > 0 and query_keep == 1.0:
        name = draw(st.sampled_from(["q", "k", "v"]))
        t = tensors[name] = tensors[name].contiguous()  # a write into a stride-0 view would poison many rows
        t[draw(st.integers(0, B - 1)), draw(st.integers(0, H - 1)), draw(st.integers(0, N - 1)),
          draw(st.integers(0, D - 1))] = poison
    kwargs = dict(sparsity=sparsity, policy=policy, query_keep=query_keep, tile=tile, scale=scale)
    return tensors, grid, kwargs, bad


def expected_attention(q, k, v, grid, kwargs):
    """The reference result of a valid call: the masked float64 reference on the selection the
    call makes (and query_keep's centre broadcast)."""
    sel = si.select_blocks(q, k, grid, **kwargs)
    tile = kwargs["tile"]
    scale = kwargs["scale"] or q.shape[-1] ** -0.5
    ref, _ = masked_reference(q.cpu(), k.cpu(), v.cpu(), sel.dense_mask().cpu(), grid, tile, scale)
    if kwargs["query_keep"] < 1.0:
        _, source = reference_query_keep(q.cpu(), grid, tile, kwargs["query_keep"])
        ref = torch.gather(ref, 2, source.unsqueeze(-1).expand_as(ref))
    return ref


@given(call=attention_calls(bad_arguments=False))
def test_video_sparse_attention_valid_inputs_give_the_reference(call):
    (tensors, grid, kwargs, _) = call
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    out = si.video_sparse_attention(q, k, v, grid, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    if q.numel() == 0:
        return
    ref = expected_attention(q, k, v, grid, kwargs)
    assert_same_nonfinite_and_close(out, ref, TOL[q.dtype], "out")
    dense = kwargs["policy"] is None and kwargs["sparsity"] == 0.0 and kwargs["query_keep"] == 1.0
    if dense:  # exact dense: SDPA
        sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=kwargs["scale"])
        assert_same_nonfinite_and_close(out, sdpa, TOL[q.dtype], "out vs SDPA")


@MANY
@given(call=attention_calls(bad_arguments=True))
def test_video_sparse_attention_bad_arguments_are_named(call):
    (tensors, grid, kwargs, bad) = call
    with pytest.raises((ValueError, TypeError)) as info:
        si.video_sparse_attention(tensors["q"], tensors["k"], tensors["v"], grid, **kwargs)
    bad.check(info.value)
    if "v" not in bad.names():  # select_blocks checks the same arguments, v aside
        kw = {n: kwargs[n] for n in ("sparsity", "policy", "query_keep", "tile", "scale")}
        try:
            si.select_blocks(tensors["q"], tensors["k"], grid, **kw)
        except (ValueError, TypeError) as error:
            bad.check(error)


@given(call=attention_calls(bad_arguments=False))
def test_select_blocks_lists_are_well_formed_and_rank_nan_lowest(call):
    (tensors, grid, kwargs, _) = call
    q, k = tensors["q"], tensors["k"]
    sel = si.select_blocks(q, k, grid, **kwargs)
    B, H = q.shape[:2]
    counts = sel.counts.cpu()
    M = counts.shape[0]
    assert sel.kv_num_blocks.shape == (B, H, M) and sel.kv_num_blocks.dtype == torch.int32
    assert int(counts.sum()) == math.prod(grid)
    num, idx = sel.kv_num_blocks.cpu(), sel.kv_indices.cpu()
    for b in range(B):
        for h in range(H):
            for i in range(M):
                n = int(num[b, h, i])
                assert 0 <= n <= M
                if n not in (0, M):  # full rows store no entries
                    row = idx[b, h, i, :n].tolist()
                    assert row == sorted(set(row)) and all(0 <= j < M for j in row)
    policy = kwargs["policy"]
    if (policy is None or policy == TopK(0.5)) and q.dtype == torch.float64 and q.numel():
        # TopK in float64: the kept tiles are the k best of the pooled scores, NaN lowest.
        sparsity = kwargs["sparsity"] if policy is None else 0.5
        keep = max(1, math.ceil(round((1 - sparsity) * M, 9)))
        ids = tile_ids(grid, kwargs["tile"])
        one_hot = F.one_hot(ids, M).double()
        size = one_hot.sum(0)[:, None]
        pool = [torch.einsum("bhnd,nm->bhmd", x.cpu().double(), one_hot) / size for x in (q, k)]
        scores = pool[0] @ pool[1].transpose(-1, -2)
        mask = sel.dense_mask().cpu()
        for b in range(B):
            for h in range(H):
                for i in range(M):
                    want = reference_top_k(scores[b, h, i].tolist(), keep)
                    assert mask[b, h, i].nonzero().flatten().tolist() == want


# ---------------------------------------------------------------------------------------------
# sparsity(...): every argument validated; a failed context changes nothing.
# ---------------------------------------------------------------------------------------------
CONTEXT_VALUES = {
    "sparsity": ([0.0, 0.5, 0.99], [1.0, -0.5, "0.5", None, True, NAN], "[0, 1)"),
    "tile": ([(4, 4, 4), (1, 8, 8), [2, 2, 2]], [(0, 4, 4), (4, 4), (16, 16, 16), "4x4x4", (2.5, 2, 2)], "tile"),
    "min_tokens": ([0, 12288], [-1, 1.5, "10", True, None], "non-negative int"),
    "layers": ([{}, {"blocks.0.*": 0.0}, {"x": TopK(0.5)}, None],
               [["blocks.0"], {"blocks.0.*": 1.5}, {3: 0.5}, {"a": "dense"}], "layers"),
    "grid": ([(5, 6, 10), None], [(0, 6, 10), (5, 6), "5x6x10", (5, 6, 10.0)], "grid"),
    "policy": ([TopK(0.5), CumulativeMass(0.9), None, 0.5], ["topk", 1.5, object()], "policy"),
    "query_keep": ([1.0, 0.25], [0.0, 1.01, "1", True, INF], "(0, 1]"),
    "plan": ([None], ["plan.json", {"blocks.0": TopK(0.5)}], "Plan"),
}


@MANY
@given(name=st.sampled_from(sorted(CONTEXT_VALUES)), valid=st.booleans(), data=st.data())
def test_sparsity_context_validates_every_argument(name, valid, data):
    good, bad, words = CONTEXT_VALUES[name]
    value = data.draw(st.sampled_from(good if valid else bad))
    before = si.current_config()
    if valid:
        with si.sparsity(**{name: value}):
            cfg = si.current_config()
            assert cfg != before or name in ("policy", "plan", "grid", "layers") or value == getattr(before, name)
        assert si.current_config() == before
        return
    with pytest.raises(ValueError) as info:
        with si.sparsity(**{name: value}):
            pass
    assert name.split("_")[0] in str(info.value) and words in str(info.value), str(info.value)
    assert si.current_config() == before


# ---------------------------------------------------------------------------------------------
# The backend: options validated at its entry (a plain ValueError); a compiled site equals the op.
# ---------------------------------------------------------------------------------------------
@MANY
@given(name=st.sampled_from(sorted(CONTEXT_VALUES) + ["sparsty", "Sparsity", "tiles"]), valid=st.booleans(),
       data=st.data())
def test_backend_options_are_validated(name, valid, data):
    from sparse_inductor.backend import check_options

    if name not in CONTEXT_VALUES:  # unknown keys
        with pytest.raises(ValueError, match=f"unknown sparse_inductor option.*{name}.*accepted keys"):
            check_options({name: 0.5})
        return
    good, bad, words = CONTEXT_VALUES[name]
    value = data.draw(st.sampled_from(good if valid else bad))
    if valid:
        check_options({name: value})
        return
    with pytest.raises(ValueError) as info:
        check_options({name: value})
    assert words in str(info.value)


class PrePacked(torch.nn.Module):
    def forward(self, tokens):
        B, N, C = tokens.shape
        q = k = v = tokens.view(B, N, 2, C // 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


@settings(max_examples=max(2, settings.default.max_examples // 4))
@given(grid=st.sampled_from([(1, 4, 4), (2, 3, 5), (2, 4, 8)]), tile=st.sampled_from(TILES),
       sparsity=st.sampled_from([0.0, 0.5]), dtype=st.sampled_from([torch.float32, torch.float64]),
       poison=st.sampled_from([None, NAN]))
def test_backend_result_is_dense_or_the_eager_op(grid, tile, sparsity, dtype, poison):
    N = math.prod(grid)
    tokens = torch.randn(2, N, 16, generator=torch.Generator().manual_seed(N)).to(dtype)
    if poison is not None:
        tokens[1, N // 2, 3] = poison
    torch._dynamo.reset()
    with torch.no_grad(), si.sparsity(sparsity, min_tokens=0, grid=grid, tile=tile):
        got = torch.compile(PrePacked(), backend="sparse_inductor")(tokens)
    q = tokens.view(2, N, 2, 8).transpose(1, 2)
    if sparsity == 0.0:
        want = F.scaled_dot_product_attention(q, q, q)
    else:
        want = si.video_sparse_attention(q, q, q, grid, sparsity=sparsity, tile=tile)
    assert_same_nonfinite_and_close(got, want, TOL[dtype], "compiled")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# VideoSparseAttention.
# ---------------------------------------------------------------------------------------------
LAYER_ARGS = {
    "dim": ([32, 64], [0, -8, 32.0, "32", True]),
    "num_heads": ([1, 2, 4], [0, 3, 2.0, None]),  # 3 does not divide 32
    "sparsity": ([0.0, 0.5], [1.0, -0.1, "0.5"]),
    "tile": ([(4, 4, 4), (1, 2, 2)], [(4, 4), (0, 1, 1), (8, 8, 8)]),
}


@MANY
@given(name=st.sampled_from(sorted(LAYER_ARGS)), valid=st.booleans(), data=st.data())
def test_video_sparse_attention_layer_arguments(name, valid, data):
    from sparse_inductor.nn import VideoSparseAttention

    good, bad = LAYER_ARGS[name]
    args = dict(dim=32, num_heads=2)
    kwargs = {}
    value = data.draw(st.sampled_from(good if valid else bad))
    (args if name in args else kwargs)[name] = value
    if valid:
        layer = VideoSparseAttention(args["dim"], args["num_heads"], **kwargs)
        assert layer.head_dim * layer.num_heads == layer.dim
        return
    with pytest.raises(ValueError) as info:
        VideoSparseAttention(args["dim"], args["num_heads"], **kwargs)
    message = str(info.value)
    assert name.split("_")[0] in message or (name == "num_heads" and "divisible" in message), message


@given(case=st.sampled_from(["ok", "one token", "empty batch", "float16", "transposed x", "bad x dims", "bad width",
                             "bad grid", "tokens != grid", "x not a tensor"]),
       gated=st.booleans(), sparsity=st.sampled_from([0.0, 0.5]))
def test_video_sparse_attention_layer_forward(case, gated, sparsity):
    from sparse_inductor.nn import VideoSparseAttention

    torch.manual_seed(0)
    layer = VideoSparseAttention(16, 2, sparsity=sparsity, tile=(1, 2, 2), gated=gated).double()
    grid, B = ((1, 1, 1), 1) if case == "one token" else ((2, 2, 4), 0 if case == "empty batch" else 2)
    x = torch.randn(B, math.prod(grid), 16, dtype=torch.float64)
    errors = {"bad x dims": (x.reshape(-1, 16), "x must be"), "bad width": (torch.randn(2, 16, 8), "dim=16"),
              "bad grid": (x, "grid"), "tokens != grid": (torch.randn(2, 15, 16), "T*H*W"),
              "x not a tensor": ([1.0], "x must be")}
    if case in errors:
        bad_x, words = errors[case]
        with pytest.raises(ValueError, match=words.replace("*", r"\*")):
            layer(bad_x, (2, 2) if case == "bad grid" else grid)
        return
    if case == "float16":
        layer, x = layer.half(), x.half()
    if case == "transposed x":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    out = layer(x, grid)
    assert out.shape == x.shape and out.dtype == x.dtype
    if B == 0:
        return
    want, _ = reference_module(layer.double(), x.double(), grid)
    assert (out.double() - want).abs().max() < (5e-3 if case == "float16" else 1e-10)


# ---------------------------------------------------------------------------------------------
# fidelity: arguments are checked before the model runs.
# ---------------------------------------------------------------------------------------------
FIDELITY_BAD = {
    "sparsities": ([], 0.5, [1.0], ["0.5"]),
    "settings": ([], {"sparsity": 0.5}, [{"sparsty": 0.5}], ["x"]),
    "tiles": ([], (4, 4, 4), [(0, 4, 4)], [(4, 4)]),
    "warmup_steps": ([], 3, [-1], [True]),
    "backend": ("inductor", None),
    "sample_fn": (3,),
    "peak": (0, -1.0, "1", True),
    "min_tokens": (-1, 2.5),
}


@MANY
@given(name=st.sampled_from(sorted(FIDELITY_BAD)), data=st.data())
def test_fidelity_rejects_bad_arguments_before_running_the_model(name, data):
    value = data.draw(st.sampled_from(FIDELITY_BAD[name]))
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x):
            calls.append(x)
            return x

    with pytest.raises(ValueError) as info:
        si.fidelity(Model(), torch.randn(1, 4), **{name: value})
    message = str(info.value)
    keyword = {"sparsities": "sparsit", "tiles": "tile",
               "settings": "sparsty" if value == [{"sparsty": 0.5}] else "setting"}
    assert keyword.get(name, name) in message, message
    assert not calls, "the model ran before the arguments were checked"


# ---------------------------------------------------------------------------------------------
# Policy constructors.
# ---------------------------------------------------------------------------------------------
POLICY_ARGS = {
    TopK: {"sparsity": ([0.0, 0.5, 0.99], [1.0, -0.1, "0.5", True, NAN])},
    CumulativeMass: {"p": ([0.5, 1.0], [0.0, 1.5, "0.9", NAN]), "min_tiles": ([1, 8], [0, -1, 2.5, True]),
                     "max_fraction": ([0.25, 1.0], [0.0, 1.5, None])},
    Window: {"rt": ([0, 3], [-1, 1.5, "1", None]), "rh": ([0, 2], [-2, True]), "rw": ([1], [0.5])},
    Temporal: {"rh": ([0, 1], [-1, 1.0]), "rw": ([2], ["2"])},
    Stripe: {"first_frames": ([1, 2], [-1, 1.5]), "tiles": ([((0.0, 0.5, 0.5),)], [((1.0, 0.0, 0.0),), ((0.5, 0.5),),
                                                                                  "corner"])},
}


@MANY
@given(policy=st.sampled_from(sorted(POLICY_ARGS, key=lambda c: c.__name__)), valid=st.booleans(), data=st.data())
def test_policy_constructors_validate_their_arguments(policy, valid, data):
    name = data.draw(st.sampled_from(sorted(POLICY_ARGS[policy])))
    good, bad = POLICY_ARGS[policy][name]
    value = data.draw(st.sampled_from(good if valid else bad))
    base = {"first_frames": 1} if policy is Stripe and name == "tiles" else {}
    if valid:
        made = policy(**base, **{name: value})
        assert hash(made) == hash(policy(**base, **{name: value})) and made.describe()
        return
    with pytest.raises(ValueError) as info:
        policy(**base, **{name: value})
    assert name in str(info.value), str(info.value)


@MANY
@given(members=st.lists(st.sampled_from([TopK(0.5), Window(1, 1, 1), Skip(), Full(), "topk", 0.5]), max_size=3))
def test_per_head_and_union_validate_their_members(members):
    if members and all(isinstance(m, si.Policy) for m in members):
        assert PerHead(members).check_heads(len(members)) == ""
        assert "heads" in PerHead(members).check_heads(len(members) + 1)
        union = members[0]
        for m in members[1:]:
            union = union | m
        assert isinstance(union, si.Policy)
        return
    with pytest.raises(ValueError, match="PerHead"):
        PerHead(members)
    policies = [m for m in members if isinstance(m, si.Policy)]
    others = [m for m in members if not isinstance(m, si.Policy)]
    if policies and others:
        with pytest.raises(TypeError, match=r"\| combines selection policies"):
            policies[0] | others[0]
