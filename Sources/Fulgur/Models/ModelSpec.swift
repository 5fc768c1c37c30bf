import Foundation

/// What an architecture is, in the engine's terms: every layer's attention and feed-forward
/// shape, how RoPE and routing work, and where each tensor lives in the checkpoint. An
/// architecture file turns a config (Hugging Face `config.json` or GGUF metadata) into this;
/// the plan builder turns this plus the tensors into ops.
public struct ModelSpec: Sendable {
    public var architecture: String
    public var vocabSize: Int
    public var hiddenSize: Int
    public var rmsNormEps: Float
    public var tieWordEmbeddings: Bool
    public var maxPositions: Int
    public var layers: [LayerSpec]
    public var names: TensorNames
    public var bosTokenId: Int?
    public var eosTokenIds: [Int]
    public var quantization: QuantizationSpec? = nil

    public var layerCount: Int { layers.count }
}

public struct RoPESpec: Sendable, Equatable {
    public enum Style: String, Sendable { case neox, interleaved }
    /// Rotated dimensions: the first `rotaryDim` of each head.
    public var rotaryDim: Int
    public var style: Style
    /// Inverse frequency of each rotated pair.
    public var inverseFrequencies: [Double]
    /// Multiplier on cos and sin (YaRN's attention factor).
    public var attentionFactor: Double

    public static func standard(theta: Double, rotaryDim: Int, style: Style = .neox) -> RoPESpec {
        RoPESpec(rotaryDim: rotaryDim, style: style,
                 inverseFrequencies: (0..<(rotaryDim / 2)).map { 1 / pow(theta, Double(2 * $0) / Double(rotaryDim)) },
                 attentionFactor: 1)
    }
}

public struct AttentionSpec: Sendable {
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int          // query/key
    public var valueHeadDim: Int
    /// nil: no window; W: a query at position i sees keys at positions i-W+1 ... i (and, when
    /// not causal, up to i+W-1).
    public var window: Int?
    public var hasSinks: Bool
    public var qkvBias: Bool
    public var outputBias: Bool
    public var qkNorm: Bool
    public var valueScale: Float
    public var softmaxScale: Float
    public var rope: RoPESpec
    /// For checkpoints with a fused `qkv_proj`: how many row chunks it has (Xiaomi's MiMo
    /// releases: one per full-attention KV head, pre-sharded for tensor parallelism). nil
    /// means one chunk per KV head of this layer.
    public var qkvChunks: Int? = nil
    /// false for the DFlash drafter: a query also sees the keys of later tokens of its step.
    public var causal = true
}

public enum Activation: Sendable, Equatable {
    case silu
    /// gpt-oss: gate clamped above at `limit`, up clamped to ±limit, out = (up + 1) * gate * sigmoid(alpha * gate).
    case clampedSwiGLU(alpha: Float, limit: Float)
}

public enum Routing: Sendable, Equatable {
    /// Softmax over all experts, take the top k, optionally renormalize (Qwen3-MoE).
    case softmaxTopK(normalize: Bool)
    /// Top k of the router logits, softmax over those k (gpt-oss).
    case topKSoftmax
    /// Sigmoid scores; selection by score + correction bias within the best groups;
    /// weights are the plain scores, optionally renormalized, times `scaling` (DeepSeek-V3, MiMo).
    case sigmoidWithBias(normalize: Bool, scaling: Float, groups: Int, topKGroups: Int)
}

public struct MoESpec: Sendable {
    public var experts: Int
    public var topK: Int
    public var intermediate: Int
    public var routing: Routing
    public var routerBias: Bool
    public var expertBias: Bool
    public var activation: Activation
    /// How expert tensors are stored.
    public enum Layout: Sendable, Equatable {
        /// `experts.{e}.gate_proj.weight` etc., each [out, in].
        case perExpert
        /// `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; gate rows first.
        case fusedGateUp
        /// gpt-oss: `experts.gate_up_proj` [E, H, 2I] with gate/up columns interleaved and
        /// `experts.down_proj` [E, I, H], both [in, out].
        case gptOss
    }
    public var layout: Layout

    public init(experts: Int, topK: Int, intermediate: Int, routing: Routing, routerBias: Bool, expertBias: Bool,
                activation: Activation, layout: Layout) {
        self.experts = experts
        self.topK = topK
        self.intermediate = intermediate
        self.routing = routing
        self.routerBias = routerBias
        self.expertBias = expertBias
        self.activation = activation
        self.layout = layout
    }
}

public enum FeedForwardSpec: Sendable {
    case dense(intermediate: Int, activation: Activation)
    case moe(MoESpec)
}

public struct LayerSpec: Sendable {
    public var attention: AttentionSpec
    public var feedForward: FeedForwardSpec
}

/// Where a model's tensors live, by role. `layer(i, role)` gives the checkpoint name.
public struct TensorNames: Sendable {
    public var embedding: String
    public var finalNorm: String
    public var lmHead: String
    public var layerPrefix: @Sendable (Int) -> String
    public var roles: [Role: String]

    public enum Role: Sendable, Hashable {
        case attnNorm, ffnNorm, q, k, v, qkv, o, qBias, kBias, vBias, oBias, qNorm, kNorm, sinks
        case gate, up, down
        case router, routerBias, correctionBias
        case expertGate, expertUp, expertDown          // per-expert, with "{e}" for the index
        case expertGateUp, expertDownFused, expertGateUpBias, expertDownBias
    }

    public func name(_ layer: Int, _ role: Role, expert: Int? = nil) -> String {
        var n = layerPrefix(layer) + (roles[role] ?? "<\(role)>")
        if let expert { n = n.replacingOccurrences(of: "{e}", with: String(expert)) }
        return n
    }

    /// Hugging Face transformers' names (`model.layers.{i}.self_attn.q_proj.weight`, ...).
    public static func huggingFace(expertsPrefix: String = "mlp.experts.", routerName: String = "mlp.gate") -> TensorNames {
        TensorNames(
            embedding: "model.embed_tokens.weight", finalNorm: "model.norm.weight", lmHead: "lm_head.weight",
            layerPrefix: { "model.layers.\($0)." },
            roles: [
                .attnNorm: "input_layernorm.weight", .ffnNorm: "post_attention_layernorm.weight",
                .q: "self_attn.q_proj.weight", .k: "self_attn.k_proj.weight", .v: "self_attn.v_proj.weight",
                .o: "self_attn.o_proj.weight",
                .qBias: "self_attn.q_proj.bias", .kBias: "self_attn.k_proj.bias", .vBias: "self_attn.v_proj.bias",
                .oBias: "self_attn.o_proj.bias",
                .qNorm: "self_attn.q_norm.weight", .kNorm: "self_attn.k_norm.weight", .sinks: "self_attn.sinks",
                .gate: "mlp.gate_proj.weight", .up: "mlp.up_proj.weight", .down: "mlp.down_proj.weight",
                .router: routerName + ".weight", .routerBias: routerName + ".bias",
                .correctionBias: routerName + ".e_score_correction_bias",
                .expertGate: expertsPrefix + "{e}.gate_proj.weight", .expertUp: expertsPrefix + "{e}.up_proj.weight",
                .expertDown: expertsPrefix + "{e}.down_proj.weight",
                .expertGateUp: expertsPrefix + "gate_up_proj", .expertDownFused: expertsPrefix + "down_proj",
                .expertGateUpBias: expertsPrefix + "gate_up_proj_bias", .expertDownBias: expertsPrefix + "down_proj_bias",
            ])
    }

    /// llama.cpp's GGUF names (`blk.{i}.attn_q.weight`, ...).
    public static let gguf = TensorNames(
        embedding: "token_embd.weight", finalNorm: "output_norm.weight", lmHead: "output.weight",
        layerPrefix: { "blk.\($0)." },
        roles: [
            .attnNorm: "attn_norm.weight", .ffnNorm: "ffn_norm.weight",
            .q: "attn_q.weight", .k: "attn_k.weight", .v: "attn_v.weight", .o: "attn_output.weight",
            .qBias: "attn_q.bias", .kBias: "attn_k.bias", .vBias: "attn_v.bias", .oBias: "attn_output.bias",
            .qNorm: "attn_q_norm.weight", .kNorm: "attn_k_norm.weight",
            .gate: "ffn_gate.weight", .up: "ffn_up.weight", .down: "ffn_down.weight",
        ])
}
