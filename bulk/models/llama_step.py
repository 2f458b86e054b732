"""A step's forward as a plain function over a Llama or Gemma model's own modules: the engine's hot
path.

`batched_attention.forward_step` runs a step through transformers' module tree, which is right for
every architecture but costs on a CPU: a decode step of SmolLM2-135M (30 layers, one request)
spends about a fifth of its time outside the arithmetic, in decorators, keyword plumbing, a causal
mask built per call and output dataclasses. Here the same step is a loop over the layers that calls
the model's own submodules (norms, rotary embedding, linear layers, activation) in transformers'
order, so the arithmetic is transformers' own, op for op.

Quantized projections (`bulk.models.weight_quant`) run fused: q, k and v as one layer, gate and up
as another, bit-identical to the separate ones and with fewer kernel calls. Dense projections stay
separate, so that a float model computes exactly what transformers computes (a fused GEMM may sum
in another order).

A model's decode steps (one new token per request) run the layer loop as one native call
(`bulk.models.native.NativeLayers`), for every family here: the same operations in C++, without the
Python between them, over a small description of each layer (`_native_layers`: its norms, which
rotary embedding or none, its window) and of the family (`NativeFamily`), quantized or not. Prompt
chunks and machines without a C++ compiler keep the Python loop; for bfloat16 activations that loop
runs each residual add with the RMS norm after it as one native call (`native.add_rms_norm`,
`_fused_layers`), rounded as ATen rounds, bit for bit: in a 512-token chunk the norms' eight ATen
operations were about a tenth of the time.

`build` takes only what it knows: Llama's layout (Llama, Mistral, Qwen2, Qwen3, Phi-3, SmolLM3:
`LLAMA_LAYOUT`; sliding-window layers too, each attending within its window), SiLU gating and static
rotary embeddings over whole heads; and Gemma 2 and 3, whose layers differ from Llama's in what a
small description says (`Layout`: sandwich norms, GELU-tanh, soft-capped attention scores and
logits, a rotary embedding per layer type, `1 + weight` norms; their sqrt(hidden)-scaled embeddings
are their own modules, called as they are), run by the same Python loop (its native prompt
operations compute Llama's layer only; the native decode layers every family's). It checks before
use that a prefill chunk, a step mixing a chunk and a decode row, and a step of decode rows only
give logits bit-identical to transformers' forward on the same inputs. Native layers that fail are
dropped for the Python loop; a model whose Python loop fails keeps transformers' forward, which is
always correct.

    hidden   # (1, N, hidden): the step's tokens side by side
    query    # (1, heads, N, head_dim)
    kv       # (1, 2 * kv_heads, N, head_dim): the keys then the values, as the pool lays them out
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from bulk.models import batched_attention, hf_cache
from bulk.models import native as native_code
from bulk.models.batched_attention import DecodeAttention, PromptAttention, Segment, StepBatch
from bulk.models.native import NativeFamily, NativeLayer, NativeLayers
from bulk.models.weight_quant import WeightOnlyLinear, fuse

log = logging.getLogger(__name__)

Projection = Callable[[torch.Tensor], torch.Tensor]
# (normed hidden, cos, signed sin) -> query after rotary (1, heads, N, head_dim), and the keys after
# rotary and the values as one tensor (1, 2 * kv_heads, N, head_dim): the pool's layout
QKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# (normed hidden, cos, signed sin, the layer's pool, the step) -> the query after rotary, its keys and
# values written into the pool
QKVWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, StepBatch], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """What a family's decoder layer does beyond Llama's, as the step reads it from the model: the
    small description one step runs every family from. What the model's own modules compute
    (Gemma's embedding scaled by sqrt(hidden) in the weight's dtype, the activation, the rotary
    angles) the step gets by calling them, so it is transformers' arithmetic by construction; the
    one exception is Gemma's norm (`one_plus_norms`), its forward's operations over a factor
    computed once."""

    # The config field naming the MLP's activation, and the values of it the step takes.
    activation_field: str = "hidden_act"
    activations: tuple[str, ...] = ("silu",)
    # Gemma's sandwich norms: the attention's and the MLP's outputs normed before their residual
    # adds (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP's input by
    # `pre_feedforward_layernorm` (Llama's `post_attention_layernorm` is its MLP's input norm).
    sandwich: bool = False
    # Gemma 2's attention passes `attn_logit_softcapping` to the attention function (Gemma 3 keeps
    # the config field but passes none).
    attention_softcap: bool = False
    # The causal LM soft-caps its logits by `final_logit_softcapping` (Gemma 2 and 3).
    logit_softcap: bool = False
    # q/k norms applied to (1, heads, N, head_dim), after the transpose (Gemma 3), not to
    # (1, N, heads, head_dim) before it (Qwen3): the step keeps the model's order.
    head_norms_after_transpose: bool = False
    # One rotary embedding per layer type, called with it (Gemma 3: the local base for sliding
    # layers, the global one for full ones), not one for every layer.
    rotary_per_layer_type: bool = False
    # Gemma's RMS norms, which scale by `1 + weight` in float32 (`_one_plus_norm`): that factor is
    # computed once at build rather than in every call (two of a norm's ten operations), the rest as
    # the module's forward runs it.
    one_plus_norms: bool = False
    # The Python loop's native helpers (`prompt_ops`, `rotary_write_kv`) compute Llama's layer; other
    # layouts' prompt chunks run ATen's operations. (The native decode layers take every layout.)
    native: bool = True


LLAMA = Layout()
# Gemma's norm, activation and embedding are its modules' own (called, not rewritten here).
GEMMA2 = Layout(
    activation_field="hidden_activation",
    activations=("gelu_pytorch_tanh",),
    sandwich=True,
    attention_softcap=True,
    logit_softcap=True,
    one_plus_norms=True,
    native=False,
)
GEMMA3 = replace(GEMMA2, attention_softcap=False, head_norms_after_transpose=True, rotary_per_layer_type=True)


@dataclass(frozen=True)
class _Layer:
    attention: Any  # the layer's attention module: its GQA groups, read by SDPA
    scaling: float  # the attention module's (Gemma's from `query_pre_attn_scalar`)
    input_norm: Projection
    mlp_norm: Projection  # the MLP's input norm: Llama's post-attention norm, Gemma's pre-feedforward
    qkv_write: QKVWrite
    o: Projection
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    act: Callable[[torch.Tensor], torch.Tensor]
    down: Projection
    # (input norm's weight, post-attention norm's weight, their epsilon) where both norms are
    # transformers' plain RMS norm (`_rms_norm`), for the fused prompt operations; else None
    norms: tuple[torch.Tensor, torch.Tensor, float] | None
    # Its sliding window in tokens (Mistral's, Qwen2's later layers), None for full attention.
    window: int | None = None
    # Gemma's sandwich norms on the attention's and the MLP's outputs (`Layout.sandwich`), else None.
    attention_out_norm: Projection | None = None
    mlp_out_norm: Projection | None = None
    # Gemma 2's attention logit soft-capping: `attend` runs its prompt chunks through the model's
    # eager function and its decode rows through the native decode attention, which caps the scores.
    softcap: float | None = None
    # Its rotary embedding's key in the step's angles: None for the one every layer shares, the
    # layer type where each type has its own (Gemma 3).
    rotary: str | None = None


class LlamaStep:
    """`forward` has `batched_attention.forward_step`'s contract for one model."""

    def __init__(self, model: Any, use_native: bool = True, layout: Layout | None = None) -> None:
        inner = model.model
        config = model.config
        self.layout = layout = layout or LAYOUTS.get(str(getattr(config, "model_type", "")), LLAMA)
        # The Python loop's native helpers compute Llama's layer only; the native decode layers
        # take every layout (`_native_layers`).
        use_native_layers = use_native
        use_native = use_native and layout.native
        # Modules are called through their `forward`: the same computation without `nn.Module`'s
        # call machinery (hooks, which inference never sets), about 2 us a call, 7 calls a layer.
        # Gemma's embedding module scales by sqrt(hidden) in its forward, as transformers runs it.
        self.embed = inner.embed_tokens.forward
        self.rotary = inner.rotary_emb
        self.norm = self._norm(inner.norm)
        self.head = model.lm_head.forward
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.q_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # Gemma's final soft-capping of the logits, as its causal LM applies it after the head.
        self.logit_softcap: float | None = (
            getattr(config, "final_logit_softcapping", None) if layout.logit_softcap else None
        )
        layers = inner.layers[: config.num_hidden_layers]
        self._fused_write = native_code.rotary_write_kv() if use_native else None
        # (the step's cos, ones, zeros): `_identity_rotation`'s
        self._identity: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Each layer's window as transformers' cache and masks lay it out (`hf_cache`).
        windows = hf_cache.attention_windows(model) or (None,) * len(layers)
        # Each layer's rotary embedding, as Gemma3TextModel picks it: by the layer's type.
        kinds: Sequence[str | None] = (
            list(config.layer_types[: len(layers)]) if layout.rotary_per_layer_type else [None] * len(layers)
        )
        self.rotary_kinds = tuple(dict.fromkeys(kinds))  # each once, in the layers' order
        self.layers = [
            replace(self._layer(layer), window=window, rotary=kind)
            for layer, window, kind in zip(layers, windows, kinds, strict=True)
        ]
        # The residual adds and norms of bfloat16 steps as native calls (`_fused_layers`),
        # where every layer's norms are plain RMS norms; `build` drops them if the check fails.
        fusable = all(layer.norms is not None for layer in self.layers)
        self.prompt_ops: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = (
            native_code.add_rms_norm() if use_native and fusable and self.layers else None
        )
        # Decode steps run their layers as one native call (`bulk.models.native`) where it could be
        # built and takes the model's layers: the same operations, without Python between them.
        self.native: NativeLayers | None = (
            self._native_layers(model, layers, windows, kinds) if use_native_layers else None
        )

    def _native_layers(
        self, model: Any, layers: Sequence[Any], windows: Sequence[int | None], kinds: Sequence[str | None]
    ) -> NativeLayers | None:
        """The decoder `layers` described for the native decode call (`native.NativeLayer`): their
        fused projections (Phi-3's own), norms (Gemma's as their `1 + weight` factors), rotary
        embedding (which of the step's, or none) and window; None where a layer has a part the
        call does not know (`NativeLayers.of`)."""
        layout = self.layout
        caps = {
            float(getattr(layer.self_attn, "attn_logit_softcapping", None) or 0.0)
            if layout.attention_softcap
            else 0.0
            for layer in layers
        }
        if len(caps) != 1:
            return None
        family = NativeFamily(
            activation=str(getattr(model.config, layout.activation_field, "")),
            one_plus_norms=layout.one_plus_norms,
            head_norms_after_transpose=layout.head_norms_after_transpose,
            softcap=caps.pop(),
        )
        described = []
        for layer, window, kind in zip(layers, windows, kinds, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            # q/k/v and gate/up: one projection each where fused (quantized layers; Phi-3's own),
            # else each its own (a dense model's, computing what transformers computes)
            qkv = _qkv_projections(attn)
            gate_up, gate_size = _gate_up_projections(mlp)
            modules = [
                *_norm_modules(layer, layout.sandwich),
                getattr(attn, "q_norm", None),
                getattr(attn, "k_norm", None),
            ]
            norms = tuple(None if m is None else self._norm_factor(m) for m in modules)
            if any(n is None and m is not None for n, m in zip(norms, modules, strict=True)):
                return None  # a norm the native call does not compute
            described.append(
                NativeLayer(
                    projections=(*qkv, attn.o_proj, *gate_up, mlp.down_proj),
                    gate_size=gate_size,
                    norms=norms,
                    scaling=float(attn.scaling),
                    rotary=self.rotary_kinds.index(kind) if getattr(attn, "use_rope", True) else -1,
                    window=window or 0,
                )
            )
        param = layers[0].input_layernorm.weight if layers else next(model.parameters())
        heads = (self.q_heads, self.kv_heads, self.head_dim)
        return NativeLayers.of(described, family, heads, param.dtype, param.device)

    def _norm_factor(self, norm: Any) -> tuple[torch.Tensor, float] | None:
        """(weight, epsilon) of a norm as the native layers compute it: a plain RMS norm's weight,
        or Gemma's `1 + weight` in float32 (`Layout.one_plus_norms`); None for any other norm."""
        if self.layout.one_plus_norms:
            return _one_plus_factor(norm)
        return _rms_norm(norm)

    def _identity_rotation(self, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the zero angle, shaped as `cos` (`_rotate` with them leaves x as it is):
        made once per step, for the step's `cos`, which every layer without rotary shares."""
        made = self._identity
        if made is None or made[0] is not cos:
            self._identity = made = (cos, torch.ones_like(cos), torch.zeros_like(cos))
        return made[1], made[2]

    def _norm(self, norm: Any) -> Projection:
        """A norm module as the step calls it: its forward, or Gemma's with `1 + weight` computed
        once (`Layout.one_plus_norms`)."""
        if self.layout.one_plus_norms:
            fast = _one_plus_norm(norm)
            if fast is not None:
                return fast
        forward: Projection = norm.forward
        return forward

    def _head_norm(self, attention: Any, name: str) -> Projection | None:
        norm = getattr(attention, name, None)
        return None if norm is None else self._norm(norm)

    def _layer(self, layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = self.head_dim
        q_heads, kv_heads = self.q_heads, self.kv_heads
        layout = self.layout
        # Qwen3 and Gemma 3 normalise each query and key head before the rotation (`q_norm`,
        # `k_norm`): then q, k and v run as their own projections, the norms between them and the
        # rotation.
        q_norm, k_norm = self._head_norm(attn, "q_norm"), self._head_norm(attn, "k_norm")
        after_transpose = layout.head_norms_after_transpose
        head_norms = q_norm is not None or k_norm is not None
        qkv_parts = _qkv_projections(attn)
        qkv_fused: Projection | None = (
            None if head_norms or qkv_parts[1] is not None else qkv_parts[0].forward
        )
        (gate_or_both, up_part), gate_size = _gate_up_projections(mlp)
        gate_up_fused: Projection | None = gate_or_both.forward if up_part is None else None
        up_size = gate_or_both.out_features - gate_size if up_part is None else up_part.out_features
        # Phi-3 names its activation `activation_fn`, the others `act_fn`.
        act_fn = mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act_fn
        act = act_fn.forward

        def heads(x: torch.Tensor, norm: Projection | None = None) -> torch.Tensor:
            # (1, N, heads * head_dim) -> (1, heads, N, head_dim), as transformers shapes it (a
            # head's norm, where the model has one, on the (1, N, heads, head_dim) view, or on the
            # transposed one where the model norms there: Gemma 3)
            x = x.view(*x.shape[:-1], -1, head_dim)
            if norm is None:
                return x.transpose(1, 2)
            return norm(x.transpose(1, 2)) if after_transpose else norm(x).transpose(1, 2)

        qk_heads = q_heads + kv_heads
        # SmolLM3 leaves the rotary embedding out of some layers (`use_rope`, from `no_rope_layers`):
        # their queries and keys go to attention as the projections give them.
        rotate = _rotate if getattr(attn, "use_rope", True) else _unrotated
        if qkv_fused is not None:

            def qkv(
                h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                x = heads(qkv_fused(h))  # (1, heads + 2 * kv_heads, N, head_dim)
                # One rotation over the query and key heads together: elementwise, so each head
                # gets exactly the values it gets rotated alone, in a third of the operations.
                qk = rotate(x[:, :qk_heads], cos, sin)
                return qk[:, :q_heads], torch.cat((qk[:, q_heads:], x[:, qk_heads:]), dim=1)
        else:
            q_forward, k_forward, v_forward = attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward

            def qkv(
                h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                q, k = heads(q_forward(h), q_norm), heads(k_forward(h), k_norm)
                kv = torch.cat((rotate(k, cos, sin), heads(v_forward(h))), dim=1)
                return rotate(q, cos, sin), kv

        fused_write = self._fused_write if qkv_fused is not None and head_dim % 16 == 0 else None
        unrotated = rotate is _unrotated

        def qkv_write(
            h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: torch.Tensor, batch: StepBatch
        ) -> torch.Tensor:
            if fused_write is not None and h.dtype is torch.bfloat16 and cos.dtype is torch.bfloat16:
                # Rotary, the query's slice, the cat and the pool write in one native pass, bit for
                # bit: in a 512-token chunk those operations each move a few hundred kilobytes.
                assert qkv_fused is not None
                x = qkv_fused(h).contiguous()  # (1, N, (heads + 2 * kv_heads) * head_dim)
                if unrotated:
                    # A layer without rotary takes the same pass with the identity rotation:
                    # x * 1 + roll(x) * 0 is x (a zero's sign aside), and the slice, cat and
                    # write are what this layer pays for.
                    cos, sin = self._identity_rotation(cos)
                return fused_write(x, cos, sin, pool, batch.write_at, q_heads, kv_heads, head_dim)
            q, kv = qkv(h, cos, sin)
            batched_attention.write_kv(pool, batch, kv)
            return q

        if gate_up_fused is not None:

            def gate_up(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                gate, up = gate_up_fused(h).split([gate_size, up_size], dim=-1)
                return gate, up
        else:
            gate_forward, up_forward = mlp.gate_proj.forward, mlp.up_proj.forward

            def gate_up(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return gate_forward(h), up_forward(h)

        input_module, mlp_module, attention_out_module, mlp_out_module = _norm_modules(layer, layout.sandwich)
        mlp_norm = self._norm(mlp_module)
        attention_out_norm = None if attention_out_module is None else self._norm(attention_out_module)
        mlp_out_norm = None if mlp_out_module is None else self._norm(mlp_out_module)
        norms = None
        if not layout.sandwich:
            input_norm, post_norm = _rms_norm(input_module), _rms_norm(mlp_module)
            if input_norm is not None and post_norm is not None and input_norm[1] == post_norm[1]:
                norms = (input_norm[0], post_norm[0], input_norm[1])
        softcap = getattr(attn, "attn_logit_softcapping", None) if layout.attention_softcap else None
        return _Layer(
            attention=attn,
            scaling=attn.scaling,
            input_norm=self._norm(input_module),
            mlp_norm=mlp_norm,
            qkv_write=qkv_write,
            o=attn.o_proj.forward,
            gate_up=gate_up,
            act=act,
            down=mlp.down_proj.forward,
            norms=norms,
            attention_out_norm=attention_out_norm,
            mlp_out_norm=mlp_out_norm,
            softcap=softcap,
        )

    @torch.inference_mode()
    def forward(
        self,
        token_ids: Sequence[int],
        batch: StepBatch,
        logits_at: Sequence[int],
        pad_to: int | None = None,
    ) -> torch.Tensor:
        ids, pos, keep = batched_attention.step_inputs(token_ids, batch, logits_at, pad_to)
        hidden = self.embed(ids)  # (1, N, hidden)
        # Each rotary embedding's (cos, signed sin), (1, 1, N, head_dim) each, shared by every head
        # of the layers that use it: one for all layers, or one per layer type (Gemma 3).
        angles = {kind: self._angles(hidden, pos, kind) for kind in self.rotary_kinds}
        n = hidden.shape[1]
        if self.native is not None and self.native.takes(batch, n):
            hidden = self.native.run(hidden, [t for kind in self.rotary_kinds for t in angles[kind]], batch)
        elif self.prompt_ops is not None and hidden.dtype is torch.bfloat16:
            hidden = self._fused_layers(hidden, *angles[None], batch, self.prompt_ops)
            # The final norm is per row: only the rows whose logits are asked for.
            logits = self.head(self.norm(hidden[:, keep, :]))
            return logits[0, : len(logits_at)]  # (len(logits_at), vocab)
        else:
            hidden = self._layers(hidden, angles, batch)
        hidden = self.norm(hidden)
        logits = self.head(hidden[:, keep, :])
        cap = self.logit_softcap
        if cap is not None:  # Gemma's, in its causal LM's three operations
            logits = torch.tanh(logits / cap) * cap
        return logits[0, : len(logits_at)]  # (len(logits_at), vocab)

    def _angles(
        self, hidden: torch.Tensor, pos: torch.Tensor, kind: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's (cos, signed sin) for the step's positions, each (1, 1, N,
        head_dim): the model's one rotary module, called per layer type where it has one per type."""
        if kind is None:
            cos, sin = self.rotary(hidden, position_ids=pos)  # (1, N, head_dim) each
        else:
            cos, sin = self.rotary(hidden, pos, kind)
        return cos.unsqueeze(1), _signed(sin.unsqueeze(1))

    def _layers(
        self,
        hidden: torch.Tensor,
        angles: dict[str | None, tuple[torch.Tensor, torch.Tensor]],
        batch: StepBatch,
    ) -> torch.Tensor:
        n = hidden.shape[1]
        pools = batch.pool.unbind(0)  # per layer: (2, kv_heads, pool_tokens, head_dim)
        for layer, pool in zip(self.layers, pools, strict=True):
            cos, sin = angles[layer.rotary]
            residual = hidden
            q = layer.qkv_write(layer.input_norm(hidden), cos, sin, pool, batch)
            if layer.softcap is None:
                attn = batched_attention.attend(
                    layer.attention, q, pool, batch, layer.window, scaling=layer.scaling
                )
            else:  # soft-capped scores: the model's eager attention (`batched_attention.attend`)
                attn = batched_attention.attend(
                    layer.attention,
                    q,
                    pool,
                    batch,
                    layer.window,
                    scaling=layer.scaling,
                    softcap=layer.softcap,
                )
            out = layer.o(attn.reshape(1, n, -1).contiguous())  # (1, N, hidden)
            if layer.attention_out_norm is not None:  # Gemma's sandwich norm
                out = layer.attention_out_norm(out)
            hidden = residual + out
            residual = hidden
            gate, up = layer.gate_up(layer.mlp_norm(hidden))
            out = layer.down(layer.act(gate) * up)
            if layer.mlp_out_norm is not None:
                out = layer.mlp_out_norm(out)
            hidden = residual + out
        return hidden

    def _fused_layers(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: StepBatch,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """`_layers` with each residual add and the norm after it as one call (the last layer's add
        stays an add: the final norm runs on the kept rows only)."""
        n = hidden.shape[1]
        pools = batch.pool.unbind(0)  # per layer: (2, kv_heads, pool_tokens, head_dim)
        layers = self.layers
        first = layers[0].norms
        assert first is not None
        hidden, normed = add_rms_norm(hidden, None, first[0], first[2])  # (1, N, hidden) each
        for i, (layer, pool) in enumerate(zip(layers, pools, strict=True)):
            norms = layer.norms
            assert norms is not None
            q = layer.qkv_write(normed, cos, sin, pool, batch)
            attn = batched_attention.attend(
                layer.attention, q, pool, batch, layer.window, scaling=layer.scaling
            )
            out = layer.o(attn.reshape(1, n, -1).contiguous())
            hidden, normed = add_rms_norm(out, hidden, norms[1], norms[2])  # hidden + out, its norm
            gate, up = layer.gate_up(normed)
            down = layer.down(layer.act(gate) * up)
            following = layers[i + 1].norms if i + 1 < len(layers) else None
            if following is None:
                hidden = hidden + down
            else:
                hidden, normed = add_rms_norm(down, hidden, following[0], following[2])
        return hidden


# transformers' RMS norms that compute `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)`,
# as the fused prompt norm does (Gemma's `1 + weight`, say, is not one of them).
PLAIN_RMS_NORMS = (
    "LlamaRMSNorm",
    "MistralRMSNorm",
    "Qwen2RMSNorm",
    "Qwen3RMSNorm",
    "Phi3RMSNorm",
    "SmolLM3RMSNorm",
)


# Gemma's RMS norms: `(x.float() * rsqrt(mean(x.float()^2) + eps) * (1 + weight.float())).type_as(x)`.
ONE_PLUS_RMS_NORMS = ("Gemma2RMSNorm", "Gemma3RMSNorm")


def _one_plus_factor(norm: Any) -> tuple[torch.Tensor, float] | None:
    """A Gemma RMS norm's (`ONE_PLUS_RMS_NORMS`) factor `1 + weight` in float32, as its forward
    computes it per call, and its epsilon; None for any other norm."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", None)
    if type(norm).__name__ not in ONE_PLUS_RMS_NORMS or weight is None or weight.dim() != 1 or eps is None:
        return None
    with torch.no_grad():
        return 1.0 + weight.float(), float(eps)  # (dim,) float32


def _one_plus_norm(norm: Any) -> Projection | None:
    """A Gemma RMS norm (`ONE_PLUS_RMS_NORMS`) as a function with its `1 + weight` computed once, in
    float32 as its forward computes it per call, so the same bits; None for any other norm."""
    factor = _one_plus_factor(norm)
    if factor is None:
        return None
    scale, eps = factor

    def one_plus_norm(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (h * scale).type_as(x)

    return one_plus_norm


def _rms_norm(norm: Any) -> tuple[torch.Tensor, float] | None:
    """(weight (hidden,), epsilon) of a plain RMS norm (`PLAIN_RMS_NORMS`), else None."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if type(norm).__name__ not in PLAIN_RMS_NORMS or weight is None or weight.dim() != 1 or eps is None:
        return None
    return weight, float(eps)


def _unrotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """A layer without rotary embedding (SmolLM3's `no_rope_layers`): `x` as it is."""
    return x


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with its first half negated: rotating with it needs no negation per layer (`_rotate`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, bit for bit as transformers' `apply_rotary_pos_emb` computes it, in four
    operations instead of seven: its `cat(-x2, x1) * sin` is `roll(x) * cat(-sin1, sin2)` exactly
    (negating is exact, and so is moving a sign from one factor to the other). x: (1, heads, N,
    head_dim); cos, signed_sin (`_signed`): (1, 1, N, head_dim)."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)


def _qkv_projections(attn: Any) -> tuple[Any, Any, Any]:
    """q, k and v as the step multiplies them: (one projection, None, None) where they are one
    (Phi-3's `qkv_proj`, or quantized parts `fuse` joins), else (q, k, v)."""
    if hasattr(attn, "qkv_proj"):  # Phi-3: q, k and v as one projection already, in that order
        return attn.qkv_proj, None, None
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    fused = _fused(list(parts))
    return parts if fused is None else (fused, None, None)


def _gate_up_projections(mlp: Any) -> tuple[tuple[Any, Any], int]:
    """((gate and up as one projection, None), or (gate, up)), and the gate's share of the outputs."""
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: the gate then the up projection, as one
        return (mlp.gate_up_proj, None), mlp.gate_up_proj.out_features // 2
    fused = _fused([mlp.gate_proj, mlp.up_proj])
    parts = (mlp.gate_proj, mlp.up_proj) if fused is None else (fused, None)
    return parts, mlp.gate_proj.out_features


def _norm_modules(layer: Any, sandwich: bool) -> tuple[Any, Any, Any, Any]:
    """A decoder layer's norm modules: its input's, its MLP's input's, and (Gemma's sandwich norms,
    `Layout.sandwich`; else None) its attention's and its MLP's outputs'. Llama's post-attention norm
    is its MLP's input norm; Gemma's post-attention norm is on the attention's output."""
    if sandwich:
        return (
            layer.input_layernorm,
            layer.pre_feedforward_layernorm,
            layer.post_attention_layernorm,
            layer.post_feedforward_layernorm,
        )
    return layer.input_layernorm, layer.post_attention_layernorm, None, None


# Fused layers by their first part: every engine over one loaded model (a benchmark runs several)
# shares one fused copy, whose views the parts already read.
_fusions: weakref.WeakKeyDictionary[nn.Module, WeightOnlyLinear] = weakref.WeakKeyDictionary()


def _forward(module: nn.Module | None) -> Projection | None:
    return None if module is None else module.forward


def _fused(parts: list[Any]) -> WeightOnlyLinear | None:
    if not all(isinstance(p, WeightOnlyLinear) for p in parts):
        return None
    fused = _fusions.get(parts[0])
    if fused is None:
        fused = fuse(parts)
        if fused is not None:
            _fusions[parts[0]] = fused
    return fused


# Families whose decoder layer is transformers' Llama layer, module for module (RMS norms; q, k, v, o;
# a SiLU-gated MLP; default rotary): Mistral is Llama without the bias option; Qwen2 adds a bias to
# q, k and v (the projections' own `forward` adds it, as the native layers do); Qwen3 a norm on each
# query and key head before the rotation (`_layer`); Phi-3 fuses q/k/v and gate/up into one
# projection each, as our quantized layers are fused (its whole head rotated); SmolLM3 leaves the
# rotary embedding out of some layers. The native decode layers take each of these differences from
# the layer's description (`_native_layers`). What else may differ is caught by the check against
# transformers at build.
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3")

# Every family the step takes, by model type, with what its layer does beyond Llama's: Gemma 2 and 3
# (`Gemma3TextConfig`'s "gemma3_text"; the multimodal "gemma3" wraps it otherwise) norm with
# `1 + weight`, scale their embeddings, gate with GELU-tanh and add sandwich norms; Gemma 2
# soft-caps attention scores and logits, Gemma 3 the logits where its config says so, with q/k
# norms and a rotary embedding per layer type.
LAYOUTS: dict[str, Layout] = {**dict.fromkeys(LLAMA_LAYOUT, LLAMA), "gemma2": GEMMA2, "gemma3_text": GEMMA3}


# Rotary embeddings whose angles depend on the position only (Llama 3's scaling, linear, YaRN): the
# step calls the model's own rotary module, so they come out as transformers computes them. The
# dynamic kinds ("dynamic", "longrope") change their frequencies with the longest position a forward
# holds, which in a batched step is another request's: those keep transformers' forward.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


# Outcomes of the check against transformers, by `build`'s `checked_as` key.
_checked: dict[str, str | None] = {}


def build(
    model: Any, checked_as: str | None = None, native: bool = True
) -> tuple[LlamaStep | None, str | None]:
    """The plain forward for `model` (whose attention `batched_attention.enable` already routed
    through the pool), or None and why it keeps transformers' forward. `checked_as` names these
    weights in this dtype on this device (the model's fingerprint): the check against transformers
    runs once per name in a process, not for every engine that loads the same model again.
    `native`: decode steps through `bulk.models.native` where it applies and passes the check."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type) if isinstance(model_type, str) else None
    if layout is None:
        return None, f"model type {model_type!r} is not one the step knows ({', '.join(LAYOUTS)})"
    activation = getattr(config, layout.activation_field, None)
    if activation not in layout.activations:
        return None, f"activation {activation!r} is not {' or '.join(layout.activations)}"
    if getattr(config, "use_bidirectional_attention", None):  # Gemma's encoder option: no causal mask
        return None, "its attention is bidirectional"
    rope = getattr(config, "rope_parameters", None) or {}
    # Gemma 3 has one set of parameters per layer type (its local and global rotary embeddings).
    kinds = dict.fromkeys(config.layer_types) if layout.rotary_per_layer_type else ()
    ropes = [rope.get(kind) or {} for kind in kinds] if kinds else [rope]
    for rope in ropes:
        if rope.get("rope_type", "default") not in STATIC_ROPE:
            return None, f"rotary embedding {rope.get('rope_type')!r} is not one of {', '.join(STATIC_ROPE)}"
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if partial not in (None, 1.0):
            return None, f"the rotary embedding covers {partial} of each head, not all of it"
    try:
        step = LlamaStep(model, native, layout)
    except (AttributeError, KeyError) as exc:  # a known config over modules laid out otherwise
        return None, f"its modules are not laid out as transformers' {model_type} ({exc})"
    decode_attention = native_code.decode_attention() if native else None
    # The attention kernels the engine's steps will use, so that the check covers them too.
    kernels = (decode_attention, native_code.prompt_attention() if native else None)
    mismatch = _check(model, step, checked_as, kernels)
    if mismatch and step.prompt_ops is not None:
        prompt_ops, step.prompt_ops = step.prompt_ops, None
        if _check(model, step, checked_as, kernels) is None:
            log.warning("native prompt operations rejected, prompts through ATen's: %s", mismatch)
            mismatch = None
        else:  # not theirs: keep them, and try without the native decode layers
            step.prompt_ops = prompt_ops
    if mismatch and step.native is not None:
        log.warning("native decode layers rejected, decoding through Python: %s", mismatch)
        step.native = None
        mismatch = _check(model, step, checked_as, kernels)
    if mismatch and step.prompt_ops is not None:
        step.prompt_ops = None
        mismatch = _check(model, step, checked_as, kernels)
    if mismatch:
        return None, mismatch
    return step, None


def _check(
    model: Any,
    step: LlamaStep,
    checked_as: str | None,
    kernels: tuple[DecodeAttention | None, PromptAttention | None],
) -> str | None:
    if checked_as is None:
        return _differs_from_transformers(model, step, kernels)
    layers = "native" if step.native is not None else "python"
    key = f"{checked_as}/{layers}/{step.prompt_ops is not None}/{[k is not None for k in kernels]}"
    if key not in _checked:
        _checked[key] = _differs_from_transformers(model, step, kernels)
    return _checked[key]


def _differs_from_transformers(
    model: Any, step: LlamaStep, kernels: tuple[DecodeAttention | None, PromptAttention | None]
) -> str | None:
    """Run a 5-token prefill, a step of a chunk and a decode row, and a step of decode rows only (the
    native layers' kind) through both forwards, on a scratch pool, with the decode attention the
    engine's steps will use (`kernels`: the decode rows' and the prompt chunks'); the logits must be
    bit-identical."""
    decode_attention, prompt_attention = kernels
    config = model.config
    param = next(model.parameters())
    kv_heads = config.num_key_value_heads
    shape = (config.num_hidden_layers, 2, kv_heads, 8, step.head_dim)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (6,), generator=generator).tolist()
    for segments, ids, rows_from in (  # rows_from: where the decode rows start
        ([Segment(0, 0, 5)], tokens[:5], 1),
        ([Segment(0, 2, 3), Segment(5, 0, 1)], tokens[2:6], 1),
        ([Segment(0, 2, 1), Segment(5, 0, 1)], [tokens[2], tokens[5]], 0),  # decode rows only (native)
    ):
        results = []
        for forward in (
            lambda ids, batch, at: batched_attention.forward_step(model, ids, batch, at),
            step.forward,
        ):
            kernel = decode_attention is not None and native_code.has_decode_kernel(model)
            dtype = batched_attention.pool_dtype(param.dtype, param.device, kernel)  # as the runner's
            pool = torch.zeros(shape, dtype=dtype, device=param.device)
            # Keys and values of the cached tokens: a prefill of them through transformers first.
            if segments[0].cached:
                warm = batched_attention.step_batch(pool, [Segment(0, 0, segments[0].cached)])
                batched_attention.forward_step(model, tokens[: segments[0].cached], warm, [0])
            batch = batched_attention.step_batch(
                pool, segments, decode_attention, rows_from, prompt_attention
            )
            at = [sum(s.length for s in segments[: i + 1]) - 1 for i in range(len(segments))]
            try:
                results.append(forward(ids, batch, at))
            except Exception as exc:  # a layout the step misreads: transformers' forward stays
                if forward != step.forward:
                    raise
                return f"its step failed ({exc!r})"
        if not torch.equal(results[0], results[1]):
            diff = (results[0].float() - results[1].float()).abs().max().item()
            return f"its logits differ from transformers' forward (max difference {diff:.3g})"
    return None
