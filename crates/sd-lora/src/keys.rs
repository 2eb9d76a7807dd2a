//! From the module keys LoRA trainers write to the diffusers module names the models ask for.
//!
//! kohya flattens module paths with `_` (`lora_unet_down_blocks_0_attentions_0_proj_in`, or the
//! LDM spelling `lora_unet_input_blocks_1_1_proj_in` that SDXL trainers use), which cannot be
//! undone by string rules alone (`to_out_0`, `ff_net_0_proj`). So the resolver lists every
//! weight-carrying module of the model (from the configs), spells each one every way a trainer
//! may, and looks keys up in that table.

use std::collections::HashMap;

use sd_models::keymap::{unet_from_ldm, unet_modules, unet_to_ldm, Component};
use sd_models::{ClipConfig, ModelConfig, UNetConfig};

/// How a kohya key spells UNet blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetNaming {
    /// diffusers block names (`down_blocks_1_attentions_0`), kohya's SD 1.x/2.x default.
    Diffusers,
    /// LDM/SGM block names (`input_blocks_4_1`), kohya's SDXL default.
    Ldm,
}

/// The kohya key of a module: `lora_unet_…`, `lora_te_…` / `lora_te1_…` / `lora_te2_…`.
///
/// `two_encoders` picks `lora_te1_` over `lora_te_` for the first text encoder (SDXL);
/// `None` when the module has no LDM spelling under `cfg`.
pub fn kohya_key(
    component: Component,
    module: &str,
    naming: UnetNaming,
    unet: &UNetConfig,
    two_encoders: bool,
) -> Option<String> {
    let (prefix, path) = match component {
        Component::Unet => match naming {
            UnetNaming::Diffusers => ("lora_unet_", module.to_string()),
            UnetNaming::Ldm => ("lora_unet_", unet_to_ldm(module, unet)?),
        },
        Component::TextEncoder if two_encoders => ("lora_te1_", module.to_string()),
        Component::TextEncoder => ("lora_te_", module.to_string()),
        Component::TextEncoder2 => ("lora_te2_", module.to_string()),
        Component::Vae => return None,
    };
    Some(format!("{prefix}{}", path.replace('.', "_")))
}

/// Every module of a CLIP text encoder a LoRA may target (attention and MLP linears).
pub fn text_encoder_modules(cfg: &ClipConfig) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        for m in
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
        {
            v.push(format!("text_model.encoder.layers.{i}.{m}"));
        }
    }
    if cfg.projection_dim.is_some() {
        v.push("text_projection".into());
    }
    v
}

/// Maps LoRA module keys of any supported spelling to `(component, diffusers module)`.
#[derive(Debug, Clone)]
pub struct KeyResolver {
    /// kohya flat keys (prefix included) → target.
    flat: HashMap<String, (Component, String)>,
    /// Dotted module names per component.
    dotted: HashMap<Component, std::collections::HashSet<String>>,
    /// Text-encoder modules without the `text_model.` level → full name.
    short_te: HashMap<(Component, String), String>,
    unet: UNetConfig,
}

impl KeyResolver {
    /// A resolver for the modules of the model `cfg` describes.
    pub fn new(cfg: &ModelConfig) -> Self {
        let two = cfg.text_encoder_2.is_some();
        let mut flat = HashMap::new();
        let mut dotted: HashMap<Component, std::collections::HashSet<String>> = HashMap::new();
        for m in unet_modules(&cfg.unet) {
            for naming in [UnetNaming::Diffusers, UnetNaming::Ldm] {
                if let Some(k) = kohya_key(Component::Unet, &m, naming, &cfg.unet, two) {
                    flat.insert(k, (Component::Unet, m.clone()));
                }
            }
            dotted.entry(Component::Unet).or_default().insert(m);
        }
        let mut short_te = HashMap::new();
        let mut encoders = vec![(Component::TextEncoder, &cfg.text_encoder)];
        if let Some(te2) = &cfg.text_encoder_2 {
            encoders.push((Component::TextEncoder2, te2));
        }
        for (c, te) in encoders {
            for m in text_encoder_modules(te) {
                if let Some(k) = kohya_key(c, &m, UnetNaming::Diffusers, &cfg.unet, two) {
                    flat.insert(k, (c, m.clone()));
                }
                // Some SDXL trainers write `lora_te_` for the first encoder too.
                if two && c == Component::TextEncoder {
                    flat.insert(format!("lora_te_{}", m.replace('.', "_")), (c, m.clone()));
                }
                // transformers 5 dropped the `text_model` level, so newer files may lack it.
                if let Some(short) = m.strip_prefix("text_model.") {
                    if let Some(k) = kohya_key(c, short, UnetNaming::Diffusers, &cfg.unet, two) {
                        flat.insert(k, (c, m.clone()));
                    }
                    short_te.insert((c, short.to_string()), m.clone());
                }
                dotted.entry(c).or_default().insert(m);
            }
        }
        Self { flat, dotted, short_te, unet: cfg.unet.clone() }
    }

    /// The diffusers module a LoRA module key (without its `.lora_down.weight`-style suffix) targets.
    pub fn resolve(&self, key: &str) -> Option<(Component, String)> {
        if key.starts_with("lora_") {
            return self.flat.get(key).cloned();
        }
        let (component, path) = split_component(key);
        let path = normalize_dotted(path);
        let known = |c: Component, p: &str| self.dotted.get(&c).is_some_and(|s| s.contains(p));
        if known(component, &path) {
            return Some((component, path));
        }
        let te = if component == Component::Unet && path.starts_with("encoder.layers.") {
            Component::TextEncoder
        } else {
            component
        };
        if let Some(full) = self.short_te.get(&(te, path.clone())) {
            return Some((te, full.clone()));
        }
        if component == Component::Unet {
            // Dotted LDM names (`input_blocks.4.1.proj_in`), as some converters write them.
            let ldm = path.strip_prefix("model.diffusion_model.").unwrap_or(&path);
            if let Some(m) = unet_from_ldm(ldm, &self.unet) {
                if known(Component::Unet, &m) {
                    return Some((Component::Unet, m));
                }
            }
        }
        None
    }
}

/// Splits the diffusers/PEFT component prefix off a dotted key (no prefix means UNet, or a text
/// encoder when the path starts with `text_model.`).
fn split_component(key: &str) -> (Component, &str) {
    for (prefix, c) in [
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder),
        ("unet.", Component::Unet),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return (c, rest);
        }
    }
    if key.starts_with("text_model.") {
        return (Component::TextEncoder, key);
    }
    (Component::Unet, key)
}

/// Old diffusers attention-processor names (`attn1.processor.to_out_lora`) → module names (`attn1.to_out.0`).
fn normalize_dotted(path: &str) -> String {
    let mut p = path.replace(".processor.", ".");
    for (old, new) in [("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")]
    {
        if let Some(head) = p.strip_suffix(old) {
            p = format!("{head}{new}");
            break;
        }
    }
    // Text-encoder attention processors use the UNet spelling in old diffusers files.
    if p.contains(".self_attn.") {
        for (old, new) in [(".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out.0", ".out_proj")]
        {
            if let Some(head) = p.strip_suffix(old) {
                p = format!("{head}{new}");
                break;
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_models::SdVariant;

    #[test]
    fn spellings_of_one_module_agree() {
        let cfg = SdVariant::Xl.config();
        let r = KeyResolver::new(&cfg);
        let want = (Component::Unet, "down_blocks.1.attentions.0.proj_in".to_string());
        assert_eq!(r.resolve("lora_unet_input_blocks_4_1_proj_in"), Some(want.clone()));
        assert_eq!(r.resolve("lora_unet_down_blocks_1_attentions_0_proj_in"), Some(want.clone()));
        assert_eq!(r.resolve("unet.down_blocks.1.attentions.0.proj_in"), Some(want.clone()));
        assert_eq!(r.resolve("down_blocks.1.attentions.0.proj_in"), Some(want));
        let out = (Component::Unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0".to_string());
        assert_eq!(
            r.resolve("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora"),
            Some(out)
        );
        let te2 = (Component::TextEncoder2, "text_model.encoder.layers.3.self_attn.q_proj".to_string());
        assert_eq!(r.resolve("lora_te2_text_model_encoder_layers_3_self_attn_q_proj"), Some(te2.clone()));
        assert_eq!(r.resolve("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"), Some(te2));
        let te1 = (Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1".to_string());
        assert_eq!(r.resolve("lora_te1_text_model_encoder_layers_0_mlp_fc1"), Some(te1.clone()));
        assert_eq!(r.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1"), Some(te1.clone()));
        assert_eq!(r.resolve("lora_te1_encoder_layers_0_mlp_fc1"), Some(te1.clone()));
        assert_eq!(r.resolve("text_encoder.encoder.layers.0.mlp.fc1"), Some(te1));
        assert_eq!(r.resolve("lora_unet_not_a_module"), None);
        assert_eq!(r.resolve("lora_te3_text_model_encoder_layers_0_mlp_fc1"), None);
    }

    #[test]
    fn sd15_has_no_second_encoder() {
        let r = KeyResolver::new(&SdVariant::V1_5.config());
        assert!(r.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1").is_none());
        assert!(r.resolve("lora_te_text_model_encoder_layers_11_self_attn_out_proj").is_some());
        assert!(r.resolve("lora_te_text_model_encoder_layers_12_self_attn_out_proj").is_none());
    }
}
