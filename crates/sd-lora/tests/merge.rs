//! Merge math against hand-computed cases, and key-map round trips over generated model shapes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use proptest::prelude::*;
use sd_lora::keys::{kohya_key, text_encoder_modules, KeyResolver, UnetNaming};
use sd_lora::{LoraAdapter, LoraSet};
use sd_models::keymap::{unet_modules, Component};
use sd_models::{ModelConfig, PerBlock, SdVariant, UNetConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-lora-merge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).expect("tensor")
}

fn write(name: &str, tensors: Vec<(&str, Tensor)>) -> PathBuf {
    let p = scratch(name);
    let map: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, &p).expect("write lora");
    p
}

const Q: &str = "text_model.encoder.layers.0.self_attn.q_proj";
const KQ: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
const CONV: &str = "down_blocks.0.resnets.0.conv1";
const KCONV: &str = "lora_unet_down_blocks_0_resnets_0_conv1";

/// Serves `base` through a LoraSet wrapper for the SD 1.5 config and returns the merged weight.
fn merged(set: &LoraSet, c: Component, name: &str, base: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let shape = base.shape().clone();
    let mut map = HashMap::new();
    map.insert(name.to_string(), base);
    let cfg = SdVariant::V1_5.config();
    if c != Component::Unet {
        // The set plans on the UNet; make sure it has a plan for this config.
        set.wrap(Component::Unet, &cfg, Box::new(HashMap::<String, Tensor>::new()))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    }
    let b = set.wrap(c, &cfg, Box::new(map)).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    b.get(shape, name, Init::Const(0.), dtype, &Device::Cpu)
}

#[test]
fn linear_merge_matches_hand_computation() -> TestResult {
    // up·down = [[1,2,1],[3,4,3]]; alpha 1, rank 2 → scale 0.5; strength 2 → W + [[1,2,1],[3,4,3]].
    let p = write(
        "linear.safetensors",
        vec![
            (&format!("{KQ}.lora_down.weight"), t(&[1., 0., 1., 0., 1., 0.], &[2, 3])),
            (&format!("{KQ}.lora_up.weight"), t(&[1., 2., 3., 4.], &[2, 2])),
            (&format!("{KQ}.alpha"), Tensor::new(1f32, &Device::Cpu)?),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 2.0)?;
    let base = t(&[10., 20., 30., 40., 50., 60.], &[2, 3]);
    let w = merged(&set, Component::TextEncoder, &format!("{Q}.weight"), base, DType::F32)?;
    assert_eq!(w.to_vec2::<f32>()?, vec![vec![11., 22., 31.], vec![43., 54., 63.]]);
    let report = set.report();
    assert_eq!(report.adapters[0].applied, vec![KQ.to_string()]);
    // F16 models get the F32 merge cast once.
    let w16 = merged(
        &set,
        Component::TextEncoder,
        &format!("{Q}.weight"),
        t(&[10., 20., 30., 40., 50., 60.], &[2, 3]),
        DType::F16,
    )?;
    assert_eq!(w16.dtype(), DType::F16);
    assert_eq!(w16.to_dtype(DType::F32)?.to_vec2::<f32>()?, vec![vec![11., 22., 31.], vec![43., 54., 63.]]);
    Ok(())
}

#[test]
fn missing_alpha_means_alpha_equals_rank_and_adapters_add_up() -> TestResult {
    // Adapter A: no alpha → scale 1; up·down = [[2]] · [[1, 3]] = [[2, 6]].
    let a = write(
        "noalpha.safetensors",
        vec![
            (&format!("{KQ}.lora_A.weight"), t(&[1., 3.], &[1, 2])),
            (&format!("{KQ}.lora_B.weight"), t(&[2.], &[1, 1])),
        ],
    );
    // Adapter B (PEFT names): up·down = [[1, 1]], alpha absent.
    let b = write(
        "peft.safetensors",
        vec![
            (&format!("text_encoder.{Q}.lora_A.weight"), t(&[1., 1.], &[1, 2])),
            (&format!("text_encoder.{Q}.lora_B.weight"), t(&[1.], &[1, 1])),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&a, 0.5)?;
    set.add_file(&b, -3.0)?;
    let w = merged(&set, Component::TextEncoder, &format!("{Q}.weight"), t(&[0., 0.], &[1, 2]), DType::F32)?;
    // 0.5·[2, 6] − 3·[1, 1] = [−2, 0].
    assert_eq!(w.to_vec2::<f32>()?, vec![vec![-2., 0.]]);
    Ok(())
}

#[test]
fn conv_3x3_and_tucker_mid_merges() -> TestResult {
    let kernel: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    // 3×3 LoCon: down [1,1,3,3], up [1,1,1,1] = 2, alpha 2 (rank 1 → scale 2) → ΔW = 4·kernel.
    let p = write(
        "conv.safetensors",
        vec![
            (&format!("{KCONV}.lora_down.weight"), t(&kernel, &[1, 1, 3, 3])),
            (&format!("{KCONV}.lora_up.weight"), t(&[2.], &[1, 1, 1, 1])),
            (&format!("{KCONV}.alpha"), Tensor::new(2f32, &Device::Cpu)?),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 1.0)?;
    let w = merged(
        &set,
        Component::Unet,
        &format!("{CONV}.weight"),
        Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu)?,
        DType::F32,
    )?;
    assert_eq!(w.flatten_all()?.to_vec1::<f32>()?, kernel.iter().map(|v| 4. * v).collect::<Vec<_>>());

    // Tucker: down [2,1,1,1] = [1, 2], mid [2,2,1,2], up [1,2,1,1] = [1, 1]; ΔW[h,w] = Σ_ab up[a]·mid[a,b,h,w]·down[b].
    let mid = [1., 2., 3., 4., 5., 6., 7., 8.]; // mid[a][b][0][w]
    let p = write(
        "tucker.safetensors",
        vec![
            (&format!("{KCONV}.lora_down.weight"), t(&[1., 2.], &[2, 1, 1, 1])),
            (&format!("{KCONV}.lora_mid.weight"), t(&mid, &[2, 2, 1, 2])),
            (&format!("{KCONV}.lora_up.weight"), t(&[1., 1.], &[1, 2, 1, 1])),
        ],
    );
    // w=0: a0: 1·1 + 3·2 = 7; a1: 5·1 + 7·2 = 19 → 26.  w=1: a0: 2 + 8 = 10; a1: 6 + 16 = 22 → 32.
    let a = LoraAdapter::open(&p)?;
    assert!(a.modules()[0].has_mid());
    let d = a.delta(&a.modules()[0], &Device::Cpu)?;
    assert_eq!(d.dims(), &[1, 1, 1, 2]);
    assert_eq!(d.flatten_all()?.to_vec1::<f32>()?, vec![26., 32.]);
    Ok(())
}

#[test]
fn loha_and_lokr_match_hand_computation() -> TestResult {
    // LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank, rank 1, alpha 2 → scale 2.
    // w1a·w1b = [[1,2],[2,4]], w2a·w2b = [[3,0],[1,0]] → ⊙ = [[3,0],[2,0]] → ×2 = [[6,0],[4,0]].
    let p = write(
        "loha.safetensors",
        vec![
            (&format!("{KQ}.hada_w1_a"), t(&[1., 2.], &[2, 1])),
            (&format!("{KQ}.hada_w1_b"), t(&[1., 2.], &[1, 2])),
            (&format!("{KQ}.hada_w2_a"), t(&[3., 1.], &[2, 1])),
            (&format!("{KQ}.hada_w2_b"), t(&[1., 0.], &[1, 2])),
            (&format!("{KQ}.alpha"), Tensor::new(2f32, &Device::Cpu)?),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 0.5)?;
    let w = merged(&set, Component::TextEncoder, &format!("{Q}.weight"), t(&[1., 1., 1., 1.], &[2, 2]), DType::F32)?;
    assert_eq!(w.to_vec2::<f32>()?, vec![vec![4., 1.], vec![3., 1.]]);

    // LoKr with two full factors ignores alpha (LyCORIS): [[1,2]] ⊗ [[0,1],[1,0]] = [[0,1,0,2],[1,0,2,0]].
    let p = write(
        "lokr_full.safetensors",
        vec![
            (&format!("{KQ}.lokr_w1"), t(&[1., 2.], &[1, 2])),
            (&format!("{KQ}.lokr_w2"), t(&[0., 1., 1., 0.], &[2, 2])),
            (&format!("{KQ}.alpha"), Tensor::new(8f32, &Device::Cpu)?),
        ],
    );
    let a = LoraAdapter::open(&p)?;
    assert_eq!(a.modules()[0].scale(), 1.0);
    assert_eq!(
        a.delta(&a.modules()[0], &Device::Cpu)?.to_vec2::<f32>()?,
        vec![vec![0., 1., 0., 2.], vec![1., 0., 2., 0.]]
    );

    // LoKr with w2 = w2a·w2b (rank 1) scales by alpha/1: [[2]] ⊗ ([[1],[2]]·[[1,1]]) · 0.5 = [[1,1],[2,2]].
    let p = write(
        "lokr_dec.safetensors",
        vec![
            (&format!("{KQ}.lokr_w1"), t(&[2.], &[1, 1])),
            (&format!("{KQ}.lokr_w2_a"), t(&[1., 2.], &[2, 1])),
            (&format!("{KQ}.lokr_w2_b"), t(&[1., 1.], &[1, 2])),
            (&format!("{KQ}.alpha"), Tensor::new(0.5f32, &Device::Cpu)?),
        ],
    );
    let a = LoraAdapter::open(&p)?;
    assert_eq!(a.delta(&a.modules()[0], &Device::Cpu)?.to_vec2::<f32>()?, vec![vec![1., 1.], vec![2., 2.]]);
    // And its flat [out, in·kh·kw] update fits a conv kernel: [2, 2] → [2, 1, 1, 2].
    let p = write(
        "lokr_conv.safetensors",
        vec![
            (&format!("{KCONV}.lokr_w1"), t(&[2.], &[1, 1])),
            (&format!("{KCONV}.lokr_w2_a"), t(&[1., 2.], &[2, 1])),
            (&format!("{KCONV}.lokr_w2_b"), t(&[1., 1.], &[1, 2])),
            (&format!("{KCONV}.alpha"), Tensor::new(0.5f32, &Device::Cpu)?),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 1.0)?;
    let w = merged(
        &set,
        Component::Unet,
        &format!("{CONV}.weight"),
        Tensor::zeros((2, 1, 1, 2), DType::F32, &Device::Cpu)?,
        DType::F32,
    )?;
    assert_eq!(w.flatten_all()?.to_vec1::<f32>()?, vec![1., 1., 2., 2.]);
    Ok(())
}

#[test]
fn one_by_one_conv_lora_fits_a_linear_weight() -> TestResult {
    // SD 1.x `proj_in` is a 1×1 conv; a conv-shaped LoRA must also merge into a linear `proj_in`.
    let key = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let p = write(
        "proj.safetensors",
        vec![
            (&format!("{key}.lora_down.weight"), t(&[1., 1.], &[1, 2, 1, 1])),
            (&format!("{key}.lora_up.weight"), t(&[1., 2.], &[2, 1, 1, 1])),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 1.0)?;
    let w = merged(
        &set,
        Component::Unet,
        "down_blocks.0.attentions.0.proj_in.weight",
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu)?,
        DType::F32,
    )?;
    assert_eq!(w.to_vec2::<f32>()?, vec![vec![1., 1.], vec![2., 2.]]);
    Ok(())
}

/// A backend that records nothing and serves a constant, to show unplanned weights pass through.
struct Ones;

impl SimpleBackend for Ones {
    fn get(&self, s: Shape, _: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::ones(s, dtype, dev)
    }
    fn get_unchecked(&self, _: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape needed")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn untargeted_weights_pass_through() -> TestResult {
    let p = write(
        "pass.safetensors",
        vec![
            (&format!("{KQ}.lora_down.weight"), t(&[1.], &[1, 1])),
            (&format!("{KQ}.lora_up.weight"), t(&[1.], &[1, 1])),
        ],
    );
    let mut set = LoraSet::new();
    set.add_file(&p, 1.0)?;
    let cfg = SdVariant::V1_5.config();
    set.wrap(Component::Unet, &cfg, Box::new(Ones))?;
    let b = set.wrap(Component::TextEncoder, &cfg, Box::new(Ones))?;
    let w = b.get(
        Shape::from((2, 2)),
        "text_model.encoder.layers.1.self_attn.q_proj.weight",
        Init::Const(0.),
        DType::F32,
        &Device::Cpu,
    )?;
    assert_eq!(w.to_vec2::<f32>()?, vec![vec![1., 1.], vec![1., 1.]]);
    Ok(())
}

fn arb_unet() -> impl Strategy<Value = UNetConfig> {
    (2usize..=4, 1usize..=3, proptest::collection::vec(any::<bool>(), 4), 1usize..=3, any::<bool>()).prop_map(
        |(n, lpb, attn, depth, xl)| {
            let base = if xl { UNetConfig::sdxl(4) } else { UNetConfig::sd15(4) };
            let down: Vec<String> =
                (0..n).map(|i| if attn[i] { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string()).collect();
            let up: Vec<String> =
                (0..n).rev().map(|i| if attn[i] { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string()).collect();
            UNetConfig {
                block_out_channels: (0..n).map(|i| 32 << i.min(2)).collect(),
                down_block_types: down,
                up_block_types: up,
                layers_per_block: lpb,
                transformer_layers_per_block: PerBlock::Many((0..n).map(|i| 1 + (i * depth) % 3).collect()),
                attention_head_dim: PerBlock::One(8),
                ..base
            }
        },
    )
}

fn model_config(unet: UNetConfig, xl: bool) -> ModelConfig {
    let mut cfg = if xl { SdVariant::Xl.config() } else { SdVariant::V1_5.config() };
    cfg.unet = unet;
    cfg
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every module, spelled every way a trainer may, resolves back to itself.
    #[test]
    fn every_spelling_round_trips(unet in arb_unet(), xl in any::<bool>(), pick in any::<prop::sample::Index>()) {
        let cfg = model_config(unet, xl);
        let r = KeyResolver::new(&cfg);
        let modules = unet_modules(&cfg.unet);
        let m = &modules[pick.index(modules.len())];
        let want = Some((Component::Unet, m.clone()));
        for naming in [UnetNaming::Diffusers, UnetNaming::Ldm] {
            let k = kohya_key(Component::Unet, m, naming, &cfg.unet, xl);
            prop_assert!(k.is_some(), "{m} has no {naming:?} spelling");
            prop_assert_eq!(r.resolve(k.as_deref().unwrap_or_default()), want.clone());
        }
        prop_assert_eq!(r.resolve(&format!("unet.{m}")), want.clone());
        prop_assert_eq!(r.resolve(m), want);
        let mut encoders = vec![(Component::TextEncoder, &cfg.text_encoder)];
        if let Some(te2) = &cfg.text_encoder_2 {
            encoders.push((Component::TextEncoder2, te2));
        }
        for (c, te) in encoders {
            let mods = text_encoder_modules(te);
            let tm = &mods[pick.index(mods.len())];
            let k = kohya_key(c, tm, UnetNaming::Diffusers, &cfg.unet, xl).unwrap_or_default();
            prop_assert_eq!(r.resolve(&k), Some((c, tm.clone())));
            prop_assert_eq!(r.resolve(&format!("{}.{tm}", c.folder())), Some((c, tm.clone())));
        }
    }

    /// A resolved kohya key is exactly the kohya spelling of what it resolved to (no false matches).
    #[test]
    fn resolved_kohya_keys_spell_their_module(unet in arb_unet(), xl in any::<bool>(), tail in "[a-z0-9_]{1,30}", pick in any::<prop::sample::Index>()) {
        let cfg = model_config(unet, xl);
        let r = KeyResolver::new(&cfg);
        let modules = unet_modules(&cfg.unet);
        let m = &modules[pick.index(modules.len())];
        // Real names with a random tail, and random names.
        for key in [
            format!("lora_unet_{}_{tail}", m.replace('.', "_")),
            format!("lora_unet_{tail}"),
            format!("lora_te_{tail}"),
        ] {
            if let Some((c, found)) = r.resolve(&key) {
                let spellings: Vec<String> = [UnetNaming::Diffusers, UnetNaming::Ldm]
                    .iter()
                    .filter_map(|n| kohya_key(c, &found, *n, &cfg.unet, xl))
                    .collect();
                let short = found.strip_prefix("text_model.").unwrap_or(&found).replace('.', "_");
                let te_ok = c != Component::Unet && key.ends_with(&short);
                prop_assert!(spellings.contains(&key) || te_ok, "{key} resolved to {found}");
            }
        }
    }
}
