"""ScMoE: the shortcut-connected MoE decoder (Cai et al., ICML 2025) and its baselines, on one device.

Each MoE unit (a dense block and an MoE block whose routed experts read a shortcut source) is a
:class:`UnitProgram` the schedule can overlap; docs/scmoe.md has the equations.
Legend: B sequences, S positions, P cached positions, T = B*S tokens, D hidden, I intermediate,
E experts, K picks, W routing slots per token, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reference import reference_experts
from ..routing.config import check_choice
from ..routing.scores import FamilyScoring

ARCHS = ("top2", "shared", "scmoe", "scmoe2")
COMBINES = ("add", "cg1", "cg2")
POSITIONS = (1, 2, 3)


@dataclass
class ScMoEConfig:
    """Shape and variant of an ScMoE (or baseline) decoder (docs/scmoe.md, "Variants").  expert_intermediate_size
    defaults to intermediate_size; max_position_embeddings is informational (RoPE covers any position)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 256
    expert_intermediate_size: int | None = None
    num_experts: int = 8
    arch: str = "scmoe"
    position: int = 2
    combine: str = "cg1"
    moe_every_layer: bool = False
    norm_topk_prob: bool = False
    aux_loss_coef: float = 0.01
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        check_choice("arch", self.arch, ARCHS)
        check_choice("combine", self.combine, COMBINES)
        check_choice("position", self.position, POSITIONS)
        if self.moe_every_layer and self.shortcut and self.position != 1:
            raise ValueError("moe_every_layer=True uses the Pos-1 shortcut (the block's input); set position=1")
        if not self.moe_every_layer and self.num_layers % 2:
            raise ValueError(f"num_layers={self.num_layers}: alternating dense/MoE blocks need an even number "
                             "(or moe_every_layer=True)")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.top_k > self.num_experts:
            raise ValueError(f"arch {self.arch!r} routes to {self.top_k} experts; num_experts={self.num_experts}")

    @property
    def top_k(self) -> int:
        return 2 if self.arch in ("top2", "scmoe2") else 1

    @property
    def shortcut(self) -> bool:
        return self.arch in ("scmoe", "scmoe2")

    @property
    def source(self) -> int:
        """Where the routed experts read: 0 = the MoE block's own post-attention state, else Pos-1/2/3."""
        return self.position if self.shortcut else 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScMoEOutput:
    """``loss`` = ``lm_loss`` + aux_loss_coef · ``aux_loss`` when labels are given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class KVCache:
    """Per-block keys and values, (B, Hk, P, Dh) each, grown by concatenation (small models, greedy decoding)."""

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers
        self.v = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[2])

    def update(self, layer: int, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor):
        if self.k[layer] is not None:
            k_BHSd = torch.cat([self.k[layer], k_BHSd], dim=2)
            v_BHSd = torch.cat([self.v[layer], v_BHSd], dim=2)
        self.k[layer], self.v[layer] = k_BHSd, v_BHSd
        return k_BHSd, v_BHSd


@dataclass
class ForwardContext:
    """What every block needs about the forward in flight."""

    batch: int
    seq: int
    cos_SDh: torch.Tensor
    sin_SDh: torch.Tensor
    cache: KVCache | None
    attn_mask: torch.Tensor | None  # (B, 1, S, P+S) bool, or None with is_causal
    is_causal: bool
    valid_BS: torch.Tensor | None  # padding of the current tokens (capacity, aux loss)
    source_rank: int | None = None  # set by the expert-parallel schedule


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, grouped key/value heads and an optional KV cache."""

    def __init__(self, cfg: ScMoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        D, Dh = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * Dh, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * Dh, bias=False)
        self.o_proj = nn.Linear(self.num_heads * Dh, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        Dh = self.head_dim
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, Dh).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, Dh).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, Dh).transpose(1, 2)
        cos, sin = ctx.cos_SDh.to(q.dtype), ctx.sin_SDh.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


def scale_as(coef: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(coef * x).to(dtype)`` (default x's dtype), the product in the promoted dtype rounded once; without
    autograd one kernel writing ``dtype`` directly (no float32 copy of x), same values."""
    dtype = x.dtype if dtype is None else dtype
    if torch.is_grad_enabled() and (coef.requires_grad or x.requires_grad):
        return (coef * x).to(dtype)
    return torch.mul(coef, x, out=torch.empty(torch.broadcast_shapes(coef.shape, x.shape), dtype=dtype,
                                              device=x.device))


class SwiGLU(nn.Module):
    """The dense MLP and the shared expert: down(act(gate(x)) * up(x)), transformers' MLP names."""

    def __init__(self, hidden: int, intermediate: int, act_fn: Callable = F.silu):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Softmax router with the transformers 5.x interface ``forward(x_TD) -> (logits_TE, weights_TK, ids_TK)``:
    float32 probabilities, the picks' scores as weights (renormalised over the picks when ``normalize``)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.num_experts, self.top_k, self.normalize = num_experts, top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))

    @property
    def scoring(self) -> FamilyScoring:
        return FamilyScoring(kind="softmax", normalize=self.normalize)

    def forward(self, x_TD: torch.Tensor):
        logits_TE = F.linear(x_TD, self.weight)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return logits_TE, weights_TK, ids_TK


class FusedExperts(nn.Module):
    """E SwiGLU experts in transformers' fused layout: gate_up_proj (E, 2I, D) gate rows first, down_proj
    (E, D, I), computed by moepatch.ops.reference (sentinel slots skipped, slots summed in fp32)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act_fn = F.silu

    def _apply_gate(self, gate_up_PX: torch.Tensor) -> torch.Tensor:
        """act(gate) * up, under transformers' experts name (parallel.ep calls it; longcat.py reuses it)."""
        gate, up = gate_up_PX.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x_TD: torch.Tensor, ids_TW: torch.Tensor, weights_TW: torch.Tensor) -> torch.Tensor:
        """Args: x_TD (T, D); ids_TW (T, W) int64 in [0, E]; weights_TW (T, W). Returns (T, D) in x's dtype."""
        return reference_experts(x_TD, ids_TW, weights_TW, self.gate_up_proj, self.down_proj)


def load_balancing_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor, valid_T: torch.Tensor | None = None):
    """Switch-style auxiliary loss E · Σ_e f_e · P_e (f_e: share of the pairs routed to e, P_e: mean router
    probability of e); 1 at perfect balance for any top-k."""
    E = logits_TE.shape[-1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    onehot_TE = torch.zeros_like(probs_TE).scatter_add_(1, ids_TK, torch.ones_like(ids_TK, dtype=probs_TE.dtype))
    if valid_T is not None:
        m_T = valid_T.to(probs_TE.dtype)[:, None]
        probs_TE, onehot_TE = probs_TE * m_T, onehot_TE * m_T
        n = m_T.sum().clamp_min(1.0)
    else:
        n = float(max(probs_TE.shape[0], 1))
    f_E = onehot_TE.sum(0) / (n * ids_TK.shape[1])
    p_E = probs_TE.sum(0) / n
    return E * (f_E * p_E).sum()


class RoutedMoE(nn.Module):
    """The routed branch: router + fused experts.  ``capacity`` (set by ``moepatch.apply``) rewrites
    the picks; ``aux_loss`` holds the last forward's load-balancing loss while grad is on."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool, layer: int):
        super().__init__()
        self.router = TopKRouter(hidden, num_experts, top_k, normalize)
        self.experts = FusedExperts(hidden, intermediate, num_experts)
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_layer = layer
        self.capacity = None
        self.aux_loss: torch.Tensor | None = None

    def gate(self, x_TD: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Route (T, D) rows: (ids_TW, weights_TW), with the sentinel E on slots capacity dropped."""
        logits_TE, weights_TK, ids_TK = self.router(x_TD)
        valid_T = None if ctx.valid_BS is None else ctx.valid_BS.reshape(-1)
        self.aux_loss = load_balancing_loss(logits_TE, ids_TK, valid_T) if torch.is_grad_enabled() else None
        if self.capacity is None:
            return ids_TK, weights_TK
        return self.capacity.decide(self.router.scoring, self.capacity_layer, logits_TE, ids_TK, weights_TK,
                                    batch=ctx.batch, seq=ctx.seq, valid_BS=ctx.valid_BS,
                                    source_rank=ctx.source_rank)

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ids_TW, weights_TW = self.gate(x_TD, ctx)
        return self.experts(x_TD, ids_TW, weights_TW)


class Block(nn.Module):
    """One decoder block: attention, then a dense MLP (``dense``), top-k routed experts on its own
    state (``moe``, the baseline) or a shared expert + routed experts on a source (``scmoe``)."""

    def __init__(self, cfg: ScMoEConfig, layer_idx: int, kind: str):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.kind = kind
        self.input_norm = nn.RMSNorm(D, eps=eps)
        self.attn = Attention(cfg, layer_idx)
        self.post_norm = nn.RMSNorm(D, eps=eps)
        self.combine = cfg.combine
        if kind == "dense":
            self.mlp = SwiGLU(D, cfg.intermediate_size)
            return
        self.moe = RoutedMoE(D, cfg.expert_intermediate_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
                             layer_idx)
        if kind == "scmoe":
            self.shared_expert = SwiGLU(D, cfg.expert_intermediate_size)
            if cfg.combine != "add":
                self.coef_gate = nn.Linear(D, 1 if cfg.combine == "cg1" else 2, bias=False)

    def shared_branch(self, y_BSD: torch.Tensor):
        """(c · SE(y), c') of the combine; c' is None when it is 1."""
        se_BSD = self.shared_expert(y_BSD)
        if self.combine == "add":
            return se_BSD, None
        logits = self.coef_gate(y_BSD).float()
        if self.combine == "cg1":
            return scale_as(torch.sigmoid(logits), se_BSD), None
        coef_BS2 = torch.softmax(logits, dim=-1)
        return scale_as(coef_BS2[..., :1], se_BSD), coef_BS2[..., 1:]


@dataclass
class UnitProgram:
    """One MoE unit's forward split at its shortcut source: ``ops`` (the backbone ops after it, none reading
    the routed branch) run in any order relative to ``moe(x_s_TD)``; ``merge(routed_TD)`` returns (B, S, D)."""

    x_s_TD: torch.Tensor
    moe: RoutedMoE
    ops: list[tuple[str, Callable[[], None]]]
    merge: Callable[[torch.Tensor], torch.Tensor]


class ScMoEForCausalLM(nn.Module):
    """The ScMoE decoder language model (or its baselines): ``forward`` returns :class:`ScMoEOutput`,
    ``generate`` decodes greedily with a KV cache."""

    def __init__(self, config: ScMoEConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        moe_kind = "moe" if cfg.arch == "top2" else "scmoe"  # "scmoe": with a shared expert
        if cfg.moe_every_layer:
            kinds = [moe_kind] * cfg.num_layers
            self.units = [(None, i) for i in range(cfg.num_layers)]
        else:
            kinds = ["dense" if i % 2 == 0 else moe_kind for i in range(cfg.num_layers)]
            self.units = [(i, i + 1) for i in range(0, cfg.num_layers, 2)]
        self.blocks = nn.ModuleList(Block(cfg, i, k) for i, k in enumerate(kinds))
        self.norm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        Dh = D // cfg.num_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (TopKRouter, FusedExperts)):
                for p in m.parameters(recurse=False):
                    nn.init.normal_(p, 0.0, std)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)

    def moe_layers(self) -> list[RoutedMoE]:
        return [b.moe for b in self.blocks if b.kind != "dense"]

    # -- the forward ------------------------------------------------------------------------------
    def context(self, input_ids_BS: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: KVCache | None) -> ForwardContext:
        """Rotary tables and the attention mask of one forward (``attention_mask``: (B, P+S), 1 = real)."""
        B, S = input_ids_BS.shape
        device = input_ids_BS.device
        past = cache.length if cache is not None else 0
        pos_S = torch.arange(past, past + S, device=device, dtype=torch.float32)
        freqs = torch.outer(pos_S, self.inv_freq.to(device))
        emb_SDh = torch.cat([freqs, freqs], dim=-1)
        valid_BS = keys_BK = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + S):
                raise ValueError(f"attention_mask must be (batch, cached + new positions) = {(B, past + S)}, "
                                 f"got {tuple(attention_mask.shape)}")
            keys_BK = attention_mask.to(device=device, dtype=torch.bool)
            if bool(keys_BK.all()):  # NOTE: host sync; keeps the fused causal kernel when nothing is padded
                keys_BK = None
            else:
                valid_BS = keys_BK[:, past:]
        attn_mask, is_causal = None, past == 0
        if keys_BK is not None or (past > 0 and S > 1):
            q_S = torch.arange(past, past + S, device=device)
            k_K = torch.arange(past + S, device=device)
            mask_BSK = (k_K[None, :] <= q_S[:, None])[None].expand(B, S, past + S)
            if keys_BK is not None:
                # A padded query attends to itself so its softmax row is never empty (no NaN).
                mask_BSK = (mask_BSK & keys_BK[:, None, :]) | (k_K[None, None, :] == q_S[None, :, None])
            attn_mask, is_causal = mask_BSK[:, None], False
        return ForwardContext(B, S, emb_SDh.cos(), emb_SDh.sin(), cache, attn_mask, is_causal, valid_BS)

    def unit_program(self, u: int, h_BSD: torch.Tensor, ctx: ForwardContext) -> UnitProgram:
        """Split unit ``u`` (a dense block A and an MoE block B, or B alone) at its shortcut source."""
        a_idx, b_idx = self.units[u]
        A = None if a_idx is None else self.blocks[a_idx]
        Bk = self.blocks[b_idx]
        st = {"h": h_BSD}  # the residual stream, the stashed source "n" and the shared branch "se"

        def op(norm, fn, key):
            def run():  # on norm(h), or on the stashed source when that is norm(h)
                y = st.pop("n", None)
                out = fn(norm(st["h"]) if y is None else y)
                if key == "h":
                    st["h"] = st["h"] + out
                else:
                    st[key] = out

            return run

        steps = []  # (name, the norm of its input, fn, where its output goes)
        if A is not None:
            steps += [("attn_l", A.input_norm, lambda y: A.attn(y, ctx), "h"), ("mlp_l", A.post_norm, A.mlp, "h")]
        steps.append(("attn_l+1", Bk.input_norm, lambda y: Bk.attn(y, ctx), "h"))
        if Bk.kind == "scmoe":
            steps.append(("se_l+1", Bk.post_norm, Bk.shared_branch, "se"))
        ops = [(name, op(norm, fn, key)) for name, norm, fn, key in steps]
        # Ops before the source: Pos-3 reads block l's input, Pos-2 its post-attention state, Pos-1
        # its output (= block l+1's input), source 0 (no shortcut) the MoE block's own state.
        n_before = {3: 0, 2: 1, 1: 2, 0: 3}[self.config.source] - (2 if A is None else 0)
        for _, fn in ops[:n_before]:
            fn()
        norm = steps[n_before][1] if n_before < len(steps) else Bk.post_norm
        st["n"] = x_s_BSD = norm(st["h"])
        if n_before == len(steps):  # the baseline: nothing left to run, the source is not reused
            st.pop("n")

        def merge(routed_TD: torch.Tensor) -> torch.Tensor:
            routed_BSD = routed_TD.view_as(st["h"])
            if Bk.kind != "scmoe":
                return st["h"] + routed_BSD
            se, coef = st.pop("se")
            if coef is not None:
                routed_BSD = scale_as(coef, routed_BSD, se.dtype)
            return st["h"] + se + routed_BSD

        return UnitProgram(x_s_BSD.reshape(-1, x_s_BSD.shape[-1]), Bk.moe, ops[n_before:], merge)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False) -> ScMoEOutput:
        """input_ids (B, S) int64; labels (B, S) int64, -100 where ignored, shifted inside; attention_mask
        (B, P+S), 1 for real tokens (padding is neither attended, routed under capacity nor counted in the
        aux loss); past_key_values: a :class:`KVCache` from a previous call, ``use_cache`` starts one."""
        cache = past_key_values if past_key_values is not None else (
            KVCache(len(self.blocks)) if use_cache else None)
        ctx = self.context(input_ids, attention_mask, cache)
        h_BSD = self.embed_tokens(input_ids)
        for u in range(len(self.units)):
            prog = self.unit_program(u, h_BSD, ctx)
            # The single-device order: the routed branch right after its source, then the backbone.
            routed_TD = prog.moe(prog.x_s_TD, ctx)
            for _, op in prog.ops:
                op()
            h_BSD = prog.merge(routed_TD)
        return self.head(h_BSD, labels, cache)

    def head(self, h_BSD: torch.Tensor, labels: torch.Tensor | None, cache: KVCache | None) -> ScMoEOutput:
        logits = self.lm_head(self.norm(h_BSD))
        auxes = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux = torch.stack(auxes).mean() if auxes else None
        out = ScMoEOutput(logits=logits, aux_loss=aux, past_key_values=cache)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                          labels[:, 1:].reshape(-1), ignore_index=-100)
            out.loss = out.lm_loss if aux is None else out.lm_loss + self.config.aux_loss_coef * aux
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding: (B, S + new) ids.  ``use_cache=False`` reruns the whole prefix every step (to check
        the cache); prompts unpadded and of equal length; a sequence past ``eos_token_id`` keeps emitting it."""
        ids = step_in = input_ids
        cache = KVCache(len(self.blocks)) if use_cache else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self.forward(step_in, past_key_values=cache).logits[:, -1]
            nxt = logits.argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_in = nxt[:, None] if use_cache else ids
            if eos_token_id is not None and bool(done.all()):  # NOTE: host sync, once per token
                break
        return ids


def build_scmoe(config: ScMoEConfig | None = None, **overrides) -> ScMoEForCausalLM:
    """An ScMoE (or baseline) model with fresh weights: ``build_scmoe(arch="scmoe", position=2, combine="cg1")``."""
    if config is None:
        config = ScMoEConfig(**overrides)
    elif overrides:
        config = ScMoEConfig(**dict(config.to_dict(), **overrides))
    return ScMoEForCausalLM(config)


def active_parameters(model: nn.Module) -> dict:
    """Unique parameters (tied counted once) and those one token activates: a routed experts module counts
    K/E of its parameters, everything else whole.  Native ScMoE, converted and unconverted transformers
    MoE models (MoE blocks with ``gate.top_k`` and ``experts``)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied parameter once
    routed = active_routed = 0
    counted: set[int] = set()
    for m in model.modules():
        experts, top_k = None, None
        if hasattr(m, "capacity_layer"):  # RoutedMoE, ShortcutMoeBlock
            experts, top_k = m.experts, m.top_k
        elif hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m.gate, "top_k"):
            experts, top_k = m.experts, m.gate.top_k
        if experts is None or id(experts) in counted:
            continue
        counted.add(id(experts))
        n = sum(p.numel() for p in experts.parameters())
        routed += n
        active_routed += n * top_k // experts.num_experts
    return {"total": total, "routed_experts": routed, "active": total - routed + active_routed}

