"""One-token forwards (decode steps) that walk the decoder layers themselves, the dense work as CUDA graphs.

transformers launches a layer's dense work (norms, projections, MLP: about ten kernels) from Python; for an
8B model that is most of a decode step (full attention: 53 ms a token for a 10 ms floor on an H200,
benchmarks/speed/NOTES.md). Here a one-token forward walks the layers itself:

    segment 0      embedding, layer 0's input norm and q/k/v projections
    attention 0    ltri's attention with memory (retrieval, span loads, host decisions): eager
    segment 1      layer 0's o_proj, residual and MLP; layer 1's norm and q/k/v
    ...
    segment n      layer n-1's o_proj, residual and MLP; final norm and lm_head

On CUDA each segment is captured once as a CUDA graph and replayed (one launch instead of about ten);
elsewhere the same segments run eagerly. On CUDA the Llama family's RMS norms (with the residual add before each)
and the MLP's silu(gate) * up also run as ltri's kernels (``kernels/rms_norm.py``, ``kernels/silu_mul.py``;
``LtriConfig.dense_kernels``): three launches a layer where the modules' torch ops take about twenty, the MLP's
residual add done by the next layer's input norm; and q, k, v (and the MLP's gate and up) are one matmul each from
joined weights (``ltri.fused_projections``). Only the attention between the segments stays in Python, where the
memory decides what each layer reads.

Shapes: hidden (1, 1, hidden_size); query (1, nheads, 1, headdim), key and value (1, nheads_kv, 1,
headdim), pre-RoPE; an attention output (1, nheads, 1, headdim); logits (1, vocab) float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ltri.fused_projections import FusedProjections, fuse_projections
from ltri.kernels.rms_norm import rms_norm
from ltri.kernels.silu_mul import silu_mul

# attend(layer index, query, key, value, scaling) -> attention output (1, nheads, 1, headdim)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# transformers' modules whose forward the dense kernels compute (kernels/rms_norm.py, kernels/silu_mul.py)
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"SiLUActivation", "SiLU"})


@dataclass(frozen=True)
class DecoderLayer:
    """The modules of one Llama-family decoder layer (llama, mistral, qwen2, qwen3) a decode step calls."""

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    q_norm: nn.Module | None  # qwen3 normalizes each head's query and key before RoPE
    k_norm: nn.Module | None
    o_proj: nn.Module
    post_norm: nn.Module
    mlp: nn.Module
    head_dim: int
    scaling: float
    # the norms (each with the residual add before it) and the MLP's silu(gate) * up as ltri's kernels, not the
    # modules' torch ops; only where the modules are those the kernels compute (dense_kernels_fit)
    dense_kernels: bool = False
    # q, k, v and the MLP's gate and up as two joined weights (ltri.fused_projections), with the dense kernels
    fused: FusedProjections | None = None

    def project(
        self, hidden: torch.Tensor, addend: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (1, 1, hidden_size), plus addend (the last layer's MLP output, which its finish left unadded) ->
        the residual stream hidden + addend and the pre-RoPE query, key, value (1, heads, 1, headdim)."""
        normed, hidden = self.add_normalize(self.input_norm, hidden, addend)
        shape = (1, 1, -1, self.head_dim)
        if self.fused is not None:
            query, key, value = (x.view(shape) for x in self.fused.qkv(normed))
        else:
            query, key, value = (proj(normed).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            query, key = self.normalize(self.q_norm, query), self.normalize(self.k_norm, key)
        return hidden, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def finish(self, residual: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the layer's input residual (1, 1, hidden_size) and attention output (1, nheads, 1, headdim): the
        residual stream after the attention and the MLP's output (1, 1, hidden_size) apart. The layer's output is
        their sum, which the next norm adds (project's addend, or the final norm's): with the dense kernels in that
        norm's launch."""
        attended = self.o_proj(attention.transpose(1, 2).reshape(1, 1, -1))
        normed, hidden = self.add_normalize(self.post_norm, attended, residual)
        if not self.dense_kernels:
            return hidden, self.mlp(normed)
        mlp = self.mlp
        if self.fused is not None:
            gate, up = self.fused.gate_up(normed)
        else:
            gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
        return hidden, mlp.down_proj(silu_mul(gate.view(1, -1), up.view(1, -1))).view(hidden.shape)

    def add_normalize(
        self, norm: nn.Module, x: torch.Tensor, addend: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + addend), x + addend) for x (1, 1, hidden_size) (x alone without an addend): the module's
        forward after torch's add, or with dense_kernels the rms_norm kernel's, the add in the same launch."""
        if addend is None:
            return self.normalize(norm, x), x
        if not self.dense_kernels:
            summed = x + addend
            return norm(summed), summed
        width = x.shape[-1]
        normed, summed = rms_norm(addend.reshape(-1, width), norm.weight, norm.variance_epsilon, x.reshape(-1, width))
        return normed.view(x.shape), summed.view(x.shape)

    def normalize(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """norm(x) for x (..., width): the module's forward, or with dense_kernels the rms_norm kernel's."""
        if not self.dense_kernels:
            return norm(x)
        return rms_norm(x.reshape(-1, x.shape[-1]), norm.weight, norm.variance_epsilon)[0].view(x.shape)


def dense_kernels_fit(layer: DecoderLayer) -> bool:
    """Whether the layer's norms are the Llama family's RMSNorm and its MLP the SiLU-gated one, which the dense
    kernels compute (another family's norm, e.g. Gemma's 1 + weight, keeps its module)."""
    norms = [layer.input_norm, layer.post_norm] + ([layer.q_norm, layer.k_norm] if layer.q_norm is not None else [])
    mlp = layer.mlp
    return (
        all(type(norm).__name__ in RMS_NORMS for norm in norms)
        and type(mlp).__name__ in GATED_MLPS
        and type(getattr(mlp, "act_fn", None)).__name__ in SILU
    )


def _fused(layer: DecoderLayer) -> FusedProjections | None:
    return fuse_projections(layer.q_proj, layer.k_proj, layer.v_proj, layer.mlp)


def decoder_layers(model) -> list[DecoderLayer] | None:
    """The model's layers as DecoderLayers; None when a layer is not laid out as this module expects."""
    try:
        layers = model.get_decoder().layers
        return [_decoder_layer(layer) for layer in layers[: model.config.num_hidden_layers]]
    except AttributeError:
        return None


def _decoder_layer(layer) -> DecoderLayer:
    attention = layer.self_attn
    return DecoderLayer(
        input_norm=layer.input_layernorm,
        q_proj=attention.q_proj,
        k_proj=attention.k_proj,
        v_proj=attention.v_proj,
        q_norm=getattr(attention, "q_norm", None),
        k_norm=getattr(attention, "k_norm", None),
        o_proj=attention.o_proj,
        post_norm=layer.post_attention_layernorm,
        mlp=layer.mlp,
        head_dim=attention.head_dim,
        scaling=attention.scaling,
    )


class DecodeStep:
    """model(one token id) -> logits, with ltri's attention called between the dense segments."""

    def __init__(self, model, layers: list[DecoderLayer], use_graphs: bool) -> None:
        self.embed = model.get_input_embeddings()
        self.final_norm = model.get_decoder().norm
        self.lm_head = model.get_output_embeddings()
        self.layers = layers
        self.use_graphs = use_graphs
        self._graphs: GraphedSegments | None = None

    @staticmethod
    def for_model(model, use_graphs: bool, dense_kernels: bool = True) -> DecodeStep | None:
        """A DecodeStep for the model, graphs on CUDA when use_graphs, the dense kernels on CUDA when dense_kernels
        and the layers' modules fit them; None when its layers are not supported."""
        layers = decoder_layers(model)
        if layers is None:
            return None
        on_cuda = next(model.parameters()).device.type == "cuda"
        final_norm_fits = type(model.get_decoder().norm).__name__ in RMS_NORMS
        if dense_kernels and on_cuda and final_norm_fits and all(dense_kernels_fit(layer) for layer in layers):
            layers = [replace(layer, dense_kernels=True, fused=_fused(layer)) for layer in layers]
        return DecodeStep(model, layers, use_graphs and on_cuda)

    # ---- segments: segment 0 takes the token id, segment i > 0 layer i-1's residual and attention output ----
    def first_segment(self, token: torch.Tensor):
        """token (1, 1) -> (residual, query, key, value) of layer 0."""
        return self.layers[0].project(self.embed(token))

    def middle_segment(self, index: int, residual: torch.Tensor, attention: torch.Tensor):
        """Layer index-1's output, then layer index's (residual, query, key, value)."""
        return self.layers[index].project(*self.layers[index - 1].finish(residual, attention))

    def last_segment(self, residual: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The last layer's output, then logits (1, vocab) float32."""
        last = self.layers[-1]
        normed, _ = last.add_normalize(self.final_norm, *last.finish(residual, attention))
        return self.lm_head(normed)[0].float()

    # ---- the step ------------------------------------------------------------------------------
    def __call__(self, token: torch.Tensor, attend: Attend) -> torch.Tensor:
        """token: (1,) id; attend: ltri's attention of one layer. Returns logits (1, vocab) float32."""
        if self.use_graphs:
            if self._graphs is None:
                self._graphs = GraphedSegments(self, token.device)
            return self._graphs.run(token, attend)
        return self.walk(token, attend)

    def walk(self, token: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The step eagerly, segment after segment (or all recorded into one graph by whoever captures it)."""
        residual, query, key, value = self.first_segment(token.view(1, 1))
        for index, layer in enumerate(self.layers):
            attention = attend(index, query, key, value, layer.scaling)
            if index + 1 < len(self.layers):
                residual, query, key, value = self.middle_segment(index + 1, residual, attention)
        return self.last_segment(residual, attention)


class GraphedSegments:
    """The segments of a DecodeStep captured as CUDA graphs, with their static inputs and outputs.

    Graph i reads the residual that graph i-1 wrote and the attention output the eager step copied into
    attention_inputs[i-1]; the graphs share one memory pool and are always replayed in capture order.
    Captures are thread-local: the span store's writer thread may wait for its copies meanwhile.
    """

    def __init__(self, step: DecodeStep, device: torch.device) -> None:
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.scalings = [layer.scaling for layer in step.layers]
        with torch.inference_mode():
            self._warm_up(step)
            self.graphs, self.outputs, self.attention_inputs = self._capture(step)

    def _warm_up(self, step: DecodeStep) -> None:
        """Run every segment once on a side stream (cuBLAS and the allocator set up outside any capture)."""
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side):
            residual, query, _, _ = step.first_segment(self.token)
            for index in range(1, len(step.layers)):
                residual, query, _, _ = step.middle_segment(index, residual, torch.zeros_like(query))
            step.last_segment(residual, torch.zeros_like(query))
        torch.cuda.current_stream(self.token.device).wait_stream(side)

    def _capture(self, step: DecodeStep):
        pool = torch.cuda.graph_pool_handle()
        graphs, outputs, attention_inputs = [], [], []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = step.first_segment(self.token)
        graphs.append(graph)
        outputs.append(out)
        for index in range(1, len(step.layers) + 1):
            attention_inputs.append(torch.zeros_like(outputs[-1][1]))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                if index < len(step.layers):
                    out = step.middle_segment(index, outputs[-1][0], attention_inputs[-1])
                else:
                    out = step.last_segment(outputs[-1][0], attention_inputs[-1])
            graphs.append(graph)
            outputs.append(out)
        return graphs, outputs, attention_inputs

    def run(self, token: torch.Tensor, attend: Attend) -> torch.Tensor:
        self.token.copy_(token.view(1, 1))
        for index, graph in enumerate(self.graphs[:-1]):
            graph.replay()
            _, query, key, value = self.outputs[index]
            self.attention_inputs[index].copy_(attend(index, query, key, value, self.scalings[index]))
        self.graphs[-1].replay()
        return self.outputs[-1].clone()
