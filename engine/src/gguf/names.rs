//! GGUF tensor names ↔ Hugging Face (transformers Llama/Qwen2) tensor names, so that the model
//! loader can address weights the same way whichever format they came from.

/// Per-layer names: GGUF suffix after `blk.N.` → HF suffix after `model.layers.N.`.
const LAYER: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Whole-model names (full names, `.weight`/`.bias` included).
const GLOBAL: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF name of a GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`),
/// or `None` for tensors with no HF counterpart (e.g. `rope_freqs.weight`).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some(&(_, hf)) = GLOBAL.iter().find(|(g, _)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (stem, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (_, hf) = LAYER.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The GGUF name of an HF tensor; the inverse of [`gguf_to_hf`].
pub fn hf_to_gguf(name: &str) -> Option<String> {
    if let Some(&(g, _)) = GLOBAL.iter().find(|(_, h)| *h == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (stem, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (g, _) = LAYER.iter().find(|(_, h)| *h == stem)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.bias",
                "model.layers.12.self_attn.k_proj.bias",
            ),
            (
                "blk.1.attn_v.weight",
                "model.layers.1.self_attn.v_proj.weight",
            ),
            (
                "blk.1.attn_output.weight",
                "model.layers.1.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
            ),
            ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight"),
            (
                "blk.2.ffn_down.weight",
                "model.layers.2.mlp.down_proj.weight",
            ),
            (
                "blk.2.attn_norm.weight",
                "model.layers.2.input_layernorm.weight",
            ),
            (
                "blk.2.ffn_norm.weight",
                "model.layers.2.post_attention_layernorm.weight",
            ),
        ];
        for (g, h) in pairs {
            assert_eq!(gguf_to_hf(g).as_deref(), Some(h), "{g}");
            assert_eq!(hf_to_gguf(h).as_deref(), Some(g), "{h}");
        }
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf("blk.0.attn_q.scale"), None);
    }
}
