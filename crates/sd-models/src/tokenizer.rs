//! The CLIP BPE tokenizer, matching transformers' `CLIPTokenizer` (fast) token for token.
//!
//! Stable Diffusion repos ship only `vocab.json` + `merges.txt`, so the tokenizer is assembled here
//! the way transformers' CLIP converter does it rather than read from a `tokenizer.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{Lowercase, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// Start-of-text token of the CLIP vocabulary.
const BOS: &str = "<|startoftext|>";
/// End-of-text token; also the unknown token and SD 1.x's padding.
const EOS: &str = "<|endoftext|>";
/// BPE's end-of-word marker in the CLIP vocabulary.
const END_OF_WORD: &str = "</w>";
/// CLIP's pre-tokenization: contractions, letter runs, single digits, runs of other symbols.
const SPLIT_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The token that fills `encode_padded` sequences after the end-of-text token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PadToken {
    /// `<|endoftext|>` (SD 1.x, SDXL's first tokenizer).
    #[default]
    EndOfText,
    /// `!` (SD 2.x and SDXL's second, OpenCLIP tokenizer).
    Exclamation,
}

impl PadToken {
    /// The token's text in the vocabulary.
    pub fn as_str(self) -> &'static str {
        match self {
            PadToken::EndOfText => EOS,
            PadToken::Exclamation => "!",
        }
    }
}

/// A CLIP tokenizer producing the ids the CLIP text encoders expect.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`; the pad token comes from `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::NotFound { what: "tokenizer folder".into(), path: dir.to_path_buf() });
        }
        let pad = pad_token_from_configs(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            let mut inner = Tokenizer::from_file(&tokenizer_json).map_err(|e| {
                tok_err(
                    &format!(
                        "{} is not a valid tokenizer.json (delete it to use vocab.json + merges.txt)",
                        tokenizer_json.display()
                    ),
                    e,
                )
            })?;
            // Our own encode adds bos/eos and pads; a saved padding/truncation setting would interfere.
            inner.with_padding(None);
            inner
                .with_truncation(None)
                .map_err(|e| tok_err(&format!("cannot disable truncation of {}", tokenizer_json.display()), e))?;
            return Self::finish(inner, &pad);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for p in [&vocab_path, &merges_path] {
            if !p.is_file() {
                return Err(Error::Tokenizer(format!(
                    "{} is missing; a CLIP tokenizer folder needs tokenizer.json or vocab.json + merges.txt",
                    p.display()
                )));
            }
        }
        let vocab_json = read(&vocab_path)?;
        let merges_txt = read(&merges_path)?;
        let vocab = parse_vocab(&vocab_json, &vocab_path.display().to_string())?;
        let merges = parse_merges(&merges_txt, &merges_path.display().to_string())?;
        Self::from_parts(vocab, merges, &pad)
    }

    /// Builds the tokenizer from the contents of `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab_json: &str, merges_txt: &str, pad: PadToken) -> Result<Self> {
        let vocab = parse_vocab(vocab_json, "vocab.json")?;
        let merges = parse_merges(merges_txt, "merges.txt")?;
        Self::from_parts(vocab, merges, pad.as_str())
    }

    /// The real 49408-token CLIP vocabulary shipped inside this crate, so a lone single-file
    /// checkpoint can be run without downloading tokenizer files.
    #[cfg(feature = "bundled-vocab")]
    pub fn bundled(pad: PadToken) -> Result<Self> {
        use std::io::Read;
        static BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| tok_err("the bundled CLIP vocabulary is corrupt (rebuild sd-models)", e))?;
        let (vocab, merges) = vocab_from_bpe_file(&text)?;
        Self::from_parts(vocab, merges, pad.as_str())
    }

    /// Token ids of `text` between `<|startoftext|>` and `<|endoftext|>`, neither padded nor truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| tok_err("cannot tokenize the prompt", e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(self.eos);
        Ok(ids)
    }

    /// Exactly `max_len` ids: like [`encode`](Self::encode), with the prompt truncated so that the
    /// end-of-text token still fits, then padded with the pad token (transformers'
    /// `padding="max_length", truncation=True`).
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(Error::Tokenizer(format!(
                "max_len {max_len} leaves no room for the start and end tokens; use the text encoder's length (77)"
            )));
        }
        let mut ids = self.encode(text)?;
        if ids.len() > max_len {
            ids.truncate(max_len - 1);
            ids.push(self.eos);
        }
        ids.resize(max_len, self.pad);
        Ok(ids)
    }

    /// Id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Number of tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn from_parts(vocab: Vocab, merges: Merges, pad: &str) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(EOS.to_string())
            .end_of_word_suffix(END_OF_WORD.to_string())
            .build()
            .map_err(|e| {
                tok_err("vocab.json and merges.txt do not fit together (are they from the same tokenizer?)", e)
            })?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| tok_err("cannot build the whitespace normalizer", e))?;
        inner
            .with_normalizer(Some(NormalizerSequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
            .map_err(|e| tok_err("cannot set the normalizer", e))?;
        let split = Split::new(SplitPattern::Regex(SPLIT_REGEX.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| tok_err("cannot build the CLIP pre-tokenizer", e))?;
        // The split pieces never contain whitespace, so ByteLevel's own GPT-2 regex would not split
        // them further; skipping it gives the same tokens.
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        Self::finish(inner, pad)
    }

    fn finish(mut inner: Tokenizer, pad: &str) -> Result<Self> {
        // Looked up before registering the special tokens, which would otherwise add missing ones
        // with fresh ids that no CLIP text encoder knows.
        let id = |t: &Tokenizer, token: &str| t.token_to_id(token).ok_or_else(|| missing_token(token));
        let (bos, eos, pad_id) = (id(&inner, BOS)?, id(&inner, EOS)?, id(&inner, pad)?);
        // transformers registers bos, eos and pad as special tokens, so a literal "<|endoftext|>"
        // in a prompt becomes that token rather than being spelled out, and with SD2's "!" pad every
        // "!" in the prompt is the bare "!" token (id 0), never "!</w>" or a merged "!!!".
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true), AddedToken::from(pad, true)])
            .map_err(|e| tok_err("cannot register the special tokens", e))?;
        Ok(Self { bos, eos, pad: pad_id, inner })
    }
}

fn missing_token(token: &str) -> Error {
    Error::Tokenizer(format!(
        "the vocabulary has no {token:?} token; this is not a CLIP tokenizer (or its special tokens were renamed)"
    ))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn parse_vocab(json: &str, what: &str) -> Result<Vocab> {
    let map: HashMap<String, u32> =
        serde_json::from_str(json).map_err(|e| tok_err(&format!("{what} is not a JSON object of token → id"), e))?;
    Ok(map.into_iter().collect())
}

fn parse_merges(text: &str, what: &str) -> Result<Merges> {
    text.lines()
        .enumerate()
        .filter(|(i, line)| (*i != 0 || !line.starts_with("#version")) && !line.trim().is_empty())
        .map(|(i, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::Tokenizer(format!(
                    "line {} of {what} is {line:?}, expected two tokens separated by a space; the merges file is corrupt",
                    i + 1
                ))),
            }
        })
        .collect()
}

/// GPT-2's reversible map from bytes to printable characters, in the order CLIP numbers them.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars: Vec<char> = (0..=255u8).filter(|&b| printable(b)).map(char::from).collect();
    let mut n = 0;
    for b in 0..=255u8 {
        if !printable(b) {
            chars.push(char::from_u32(256 + n).unwrap_or('\u{FFFD}'));
            n += 1;
        }
    }
    chars
}

/// Rebuilds vocab and merges from OpenAI's `bpe_simple_vocab_16e6.txt` as CLIP does: the 256 byte
/// characters, the same with `</w>`, one token per merge, then `<|startoftext|>`, `<|endoftext|>`.
fn vocab_from_bpe_file(text: &str) -> Result<(Vocab, Merges)> {
    // CLIP uses the first 49152 − 256 − 2 merges so that the vocabulary has 49408 entries.
    const MERGES: usize = 49152 - 256 - 2;
    let lines: Vec<&str> = text.split('\n').skip(1).take(MERGES).collect();
    if lines.len() != MERGES {
        return Err(Error::Tokenizer(format!(
            "the BPE merges file has {} merges, CLIP needs {MERGES}; it is not bpe_simple_vocab_16e6.txt",
            lines.len()
        )));
    }
    let merges = parse_merges(&lines.join("\n"), "bpe_simple_vocab_16e6.txt")?;
    let bytes = bytes_to_unicode();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| format!("{c}{END_OF_WORD}")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.to_string());
    tokens.push(EOS.to_string());
    let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    Ok((vocab, merges))
}

/// The pad token named by a transformers tokenizer folder, `<|endoftext|>` when none is named.
fn pad_token_from_configs(dir: &Path) -> Result<String> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path: PathBuf = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(&read(&path)?)
            .map_err(|e| tok_err(&format!("{} is not valid JSON", path.display()), e))?;
        // The token is stored either as a string or as a serialised AddedToken with a `content`.
        let pad = match json.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(str::to_string),
            None => None,
        };
        if let Some(pad) = pad {
            return Ok(pad);
        }
    }
    Ok(EOS.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_permutation_in_clip_order() {
        let chars = bytes_to_unicode();
        assert_eq!(chars.len(), 256);
        assert_eq!(chars[0], '!');
        assert_eq!(chars[93], '~');
        assert_eq!(chars[94], '¡');
        // Byte 0 is the first non-printable byte, so it gets the first code point after 255.
        assert_eq!(chars[188], 'Ā');
        let mut sorted = chars.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn merges_parser_skips_header_and_rejects_garbage() {
        let m = parse_merges("#version: 0.2\ni n\nt h\n\n", "m").unwrap_or_default();
        assert_eq!(m, vec![("i".to_string(), "n".to_string()), ("t".to_string(), "h".to_string())]);
        assert!(matches!(parse_merges("#version: 0.2\nabc\n", "m"), Err(Error::Tokenizer(_))));
    }

    #[test]
    fn tokenizer_json_folder_matches_vocab_merges() -> Result<()> {
        let vocab = r#"{"a":0,"b":1,"a</w>":2,"b</w>":3,"ab</w>":4,"!":5,"!</w>":6,"!!</w>":7,"<|startoftext|>":8,"<|endoftext|>":9}"#;
        let merges = "#version: 0.2\na b</w>\n! !</w>\n";
        let mut saved = ClipTokenizer::from_vocab_merges(vocab, merges, PadToken::EndOfText)?.inner;
        // A tokenizer.json saved with padding must not pad our unpadded encode.
        saved.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(12),
            ..Default::default()
        }));
        let json = saved.to_string(false).map_err(|e| tok_err("serialise", e))?;
        let dir = std::env::temp_dir().join(format!("sd-models-tokjson-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).map_err(|source| Error::Io { path: dir.join(name), source })
        };
        write("tokenizer.json", &json)?;
        let plain = ClipTokenizer::from_folder(&dir)?.encode("AB!! b")?;
        // The folder's pad token "!" becomes special here too, as transformers would make it.
        write("tokenizer_config.json", r#"{"pad_token": "!"}"#)?;
        let bang = ClipTokenizer::from_folder(&dir)?;
        let bang_ids = bang.encode("AB!! b")?;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(plain, vec![8, 4, 7, 3, 9]);
        assert_eq!(bang_ids, vec![8, 4, 5, 5, 3, 9]);
        assert_eq!(bang_ids, ClipTokenizer::from_vocab_merges(vocab, merges, PadToken::Exclamation)?.encode("AB!! b")?);
        assert_eq!(bang.pad_id(), 5);
        Ok(())
    }
}
