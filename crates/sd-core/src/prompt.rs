//! A1111-style prompt syntax: attention weights `(word:1.3)`, `(word)`, `[word]`, escapes, `BREAK`,
//! and 75-token chunking so prompts longer than CLIP's 77 positions still count.

/// A LoRA a prompt names with A1111's extra-network syntax, `<lora:name:weight>` or
/// `<lora:name:te_weight:unet_weight>`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLora {
    /// The name as written (A1111 resolves it to a file stem in its LoRA folders).
    pub name: String,
    /// Its strength on the UNet (1 when omitted).
    pub weight: f64,
    /// Its strength on the text encoders (the UNet's unless given apart).
    pub text_encoder_weight: f64,
}

/// Removes A1111's extra-network tags (`<lora:name>`, `<lora:name:0.8>`, `<lora:name:te:unet>`,
/// `<lyco:…>`, named `te=`/`unet=`) from `prompt` and returns the remaining text and the LoRAs, in
/// order; the caller resolves the names (A1111 leaves the surrounding text as it was). Text that is
/// not a tag (`a < b`, `<3`) stays. Refused, naming `field`: other network kinds (`<hypernet:…>`),
/// empty names, weights that are not finite numbers and LyCORIS `dyn=`.
pub fn extract_lora_tags(field: &'static str, prompt: &str) -> Result<(String, Vec<PromptLora>)> {
    let mut out = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let tag = after.find('>').map(|close| &after[..close]).filter(|t| !t.contains('<'));
        let parsed = tag.and_then(|t| t.split_once(':')).filter(|(kind, body)| {
            !kind.is_empty() && kind.chars().all(|c| c.is_alphanumeric() || c == '_') && !body.is_empty()
        });
        let (Some(tag), Some((kind, body))) = (tag, parsed) else {
            out.push('<');
            rest = after;
            continue;
        };
        if !matches!(kind.to_ascii_lowercase().as_str(), "lora" | "lyco") {
            return Err(Error::invalid(
                field,
                format!("<{tag}>: extra network {kind:?} is not supported; only <lora:name:weight> (and <lyco:…>) tags are"),
            ));
        }
        loras.push(lora_tag(field, tag, body)?);
        rest = &after[tag.len() + 1..];
    }
    out.push_str(rest);
    Ok((out, loras))
}

fn lora_tag(field: &'static str, tag: &str, body: &str) -> Result<PromptLora> {
    let bad = |why: String| Error::invalid(field, format!("<{tag}>: {why}"));
    let mut parts = body.split(':').map(str::trim);
    let name = parts.next().unwrap_or_default().to_string();
    if name.is_empty() {
        return Err(bad("the LoRA name is empty".into()));
    }
    let number = |v: &str| -> Result<f64> {
        v.parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| bad(format!("{v:?} is not a finite number")))
    };
    let (mut positional, mut te, mut unet) = (Vec::new(), None, None);
    for p in parts {
        match p.split_once('=') {
            Some(("te", v)) => te = Some(number(v.trim())?),
            Some(("unet", v)) => unet = Some(number(v.trim())?),
            Some(("dyn", _)) => return Err(bad("LyCORIS dyn= (dynamic rank) is not supported; remove it".into())),
            Some((k, _)) => return Err(bad(format!("unknown option {k:?}; use <lora:name:weight>"))),
            None => positional.push(number(p)?),
        }
    }
    // A1111: the first number is the text encoder's weight, the second the UNet's (default: the same).
    let te = te.or(positional.first().copied()).unwrap_or(1.0);
    let unet = unet.or(positional.get(1).copied()).unwrap_or(te);
    if positional.len() > 2 {
        return Err(bad("at most two weights (text encoder, UNet) follow the name".into()));
    }
    Ok(PromptLora { name, weight: unet, text_encoder_weight: te })
}

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    /// Text with its attention multiplier.
    Text {
        /// The text.
        text: String,
        /// Multiplier applied to the embeddings of its tokens.
        weight: f32,
    },
    /// `BREAK`: start a new 75-token chunk here.
    Break,
}

const ROUND: f32 = 1.1;
const SQUARE: f32 = 1.0 / 1.1;

/// Deepest bracket nesting a prompt may use, counting unclosed brackets (A1111 sets no limit; real
/// prompts stay under ten). The bound keeps parsing linear: every piece is multiplied at most this
/// many times.
pub const MAX_PROMPT_NESTING: usize = 32;
/// Largest attention weight in magnitude, written (`(word:w)`) or reached by nesting.
pub const MAX_PROMPT_WEIGHT: f32 = 100.0;
/// Most 77-token chunks one prompt may encode into (long text and `BREAK`s both add chunks).
pub const MAX_PROMPT_CHUNKS: usize = 32;

pub use crate::run::{check_prompt_size, MAX_PROMPT_BYTES};
use crate::error::{Error, Result};

fn prompt_error(reason: String) -> Error {
    Error::InvalidRequest { field: "prompt", reason }
}

/// Checks what can be checked of a prompt without a tokenizer: its size, bracket nesting, attention
/// weights and `BREAK` count; errors name `field` (`prompt` or `negative_prompt`).
pub fn validate_prompt(field: &'static str, prompt: &str) -> Result<()> {
    let relabel = |e: Error| match e {
        Error::InvalidRequest { reason, .. } => Error::InvalidRequest { field, reason },
        other => other,
    };
    check_prompt_size(field, prompt)?;
    let breaks = parse_prompt_attention(prompt).map_err(relabel)?.iter().filter(|p| matches!(p, PromptPart::Break)).count();
    if breaks >= MAX_PROMPT_CHUNKS {
        return Err(Error::InvalidRequest {
            field,
            reason: format!("{breaks} BREAKs make more than the {MAX_PROMPT_CHUNKS} 75-token chunks a prompt may have"),
        });
    }
    Ok(())
}

enum Tok<'a> {
    Escaped(&'a str),
    Open(bool),
    /// `:w)` with its weight (`None`: written with an exponent, `:1e39)`) and its text (kept
    /// literal where it closes nothing).
    CloseWeight(Option<f32>, &'a str),
    Close(bool),
    Text(&'a str),
}

fn lex(prompt: &str) -> Vec<Tok<'_>> {
    let b = prompt.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\` are literal characters; a lone backslash stays text.
                if i + 1 < b.len() && matches!(b[i + 1], b'(' | b')' | b'[' | b']' | b'\\') {
                    out.push(Tok::Escaped(&prompt[i + 1..i + 2]));
                    i += 2;
                } else {
                    out.push(Tok::Text(&prompt[i..i + 1]));
                    i += 1;
                }
            }
            b'(' => {
                out.push(Tok::Open(true));
                i += 1;
            }
            b'[' => {
                out.push(Tok::Open(false));
                i += 1;
            }
            b')' => {
                out.push(Tok::Close(true));
                i += 1;
            }
            b']' => {
                out.push(Tok::Close(false));
                i += 1;
            }
            b':' => match weight_close(&prompt[i + 1..]) {
                Some((w, len)) => {
                    out.push(Tok::CloseWeight(w, &prompt[i..i + 1 + len]));
                    i += 1 + len;
                }
                None => {
                    out.push(Tok::Text(":"));
                    i += 1;
                }
            },
            _ => {
                let start = i;
                while i < b.len() && !matches!(b[i], b'\\' | b'(' | b')' | b'[' | b']' | b':') {
                    i += 1;
                }
                out.push(Tok::Text(&prompt[start..i]));
            }
        }
    }
    out
}

/// Matches `\s*([+-]?[.\d]+)\s*\)` after a colon; returns the weight and the bytes consumed. A
/// number with an exponent (`1e39`), which A1111's pattern leaves as text, is matched too and
/// returned without a weight, so the parser can refuse it instead of silently ignoring it.
fn weight_close(s: &str) -> Option<(Option<f32>, usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let start = i;
    if i < b.len() && matches!(b[i], b'+' | b'-') {
        i += 1;
    }
    let digits = i;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
        i += 1;
    }
    if i == digits {
        return None;
    }
    let number = &s[start..i];
    let mut exponent = false;
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < b.len() && matches!(b[j], b'+' | b'-') {
            j += 1;
        }
        let first = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > first {
            exponent = true;
            i = j;
        }
    }
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i < b.len() && b[i] == b')' {
        if exponent {
            return Some((None, i + 1));
        }
        // A1111 feeds the match to float(); "1.2.3" fails there too and the text stays literal.
        number.parse::<f32>().ok().map(|w| (Some(w), i + 1))
    } else {
        None
    }
}

/// Splits text on the word `BREAK` (with the whitespace around it), as A1111's `\s*\bBREAK\b\s*`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let bytes = text.as_bytes();
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut last = 0;
    let mut search = 0;
    while let Some(pos) = text[search..].find("BREAK") {
        let at = search + pos;
        let end = at + 5;
        let left_ok = at == 0 || !is_word(bytes[at - 1]);
        let right_ok = end == bytes.len() || !is_word(bytes[end]);
        if left_ok && right_ok {
            let mut l = at;
            while l > last && bytes[l - 1].is_ascii_whitespace() {
                l -= 1;
            }
            let mut r = end;
            while r < bytes.len() && bytes[r].is_ascii_whitespace() {
                r += 1;
            }
            parts.push(&text[last..l]);
            last = r;
            search = r;
        } else {
            search = at + 1;
        }
    }
    parts.push(&text[last..]);
    parts
}

/// Parses A1111 attention syntax into weighted pieces, with A1111's semantics: `(x)` ×1.1, `[x]` ÷1.1,
/// `(x:w)` ×w, nesting multiplies, unbalanced brackets apply to the end, `\(` is a literal bracket,
/// neighbouring pieces of equal weight merge, and an empty prompt is one empty piece.
///
/// Refused (as [`Error::InvalidRequest`] on `prompt`): brackets nested deeper than
/// [`MAX_PROMPT_NESTING`], and weights beyond ±[`MAX_PROMPT_WEIGHT`] (or not finite, as `1e39`
/// is in f32), written or multiplied up by nesting.
pub fn parse_prompt_attention(prompt: &str) -> Result<Vec<PromptPart>> {
    let mut res: Vec<(String, f32)> = Vec::new(); // weight -1 marks BREAK, as A1111 does
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    fn multiply(res: &mut [(String, f32)], from: usize, m: f32) {
        for r in res.iter_mut().skip(from) {
            if r.1 >= 0.0 || r.0 != "BREAK" {
                r.1 *= m;
            }
        }
    }
    for tok in lex(prompt) {
        if matches!(tok, Tok::Open(_)) && round.len() + square.len() >= MAX_PROMPT_NESTING {
            return Err(prompt_error(format!("brackets nest more than {MAX_PROMPT_NESTING} deep; close some or escape them as \\( \\[")));
        }
        match tok {
            Tok::Escaped(t) => res.push((t.to_string(), 1.0)),
            Tok::Open(true) => round.push(res.len()),
            Tok::Open(false) => square.push(res.len()),
            Tok::CloseWeight(None, raw) if !round.is_empty() => {
                return Err(prompt_error(format!(
                    "attention weight {:?} is written with an exponent; write it as a plain decimal within ±{MAX_PROMPT_WEIGHT}",
                    raw.trim_start_matches(':').trim_end_matches(')').trim()
                )));
            }
            Tok::CloseWeight(Some(w), _) if !round.is_empty() => {
                if !(w.is_finite() && w.abs() <= MAX_PROMPT_WEIGHT) {
                    return Err(prompt_error(format!("attention weight {w} is outside ±{MAX_PROMPT_WEIGHT}")));
                }
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Tok::Close(true) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND);
            }
            Tok::Close(false) if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE);
            }
            other => {
                let text: String = match other {
                    Tok::Text(t) => t.to_string(),
                    Tok::CloseWeight(_, raw) => raw.to_string(),
                    Tok::Close(true) => ")".into(),
                    Tok::Close(false) => "]".into(),
                    _ => String::new(),
                };
                for (i, part) in split_break(&text).into_iter().enumerate() {
                    if i > 0 {
                        res.push(("BREAK".into(), -1.0));
                    }
                    res.push((part.to_string(), 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let out_of_range = |(text, w): &&(String, f32)| {
        let is_break = *w == -1.0 && text == "BREAK";
        let in_range = w.is_finite() && w.abs() <= MAX_PROMPT_WEIGHT;
        !is_break && !in_range
    };
    if let Some((text, w)) = res.iter().find(out_of_range) {
        return Err(prompt_error(format!("nested attention weights multiply to {w} on {text:?}; keep them within ±{MAX_PROMPT_WEIGHT}")));
    }
    let mut merged: Vec<(String, f32)> = Vec::with_capacity(res.len());
    for (text, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w && w >= 0.0 => last.0.push_str(&text),
            _ => merged.push((text, w)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(text, weight)| if weight < 0.0 && text == "BREAK" { PromptPart::Break } else { PromptPart::Text { text, weight } })
        .collect())
}

/// One 77-token window of a prompt with a multiplier per token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    /// `[bos] + up to 75 tokens + [eos] + padding`, always `max_len` long.
    pub ids: Vec<u32>,
    /// Multiplier per position (1.0 on bos/eos/padding).
    pub weights: Vec<f32>,
    /// Textual-inversion embeddings placed in the chunk: their vectors replace the token embeddings
    /// of the placeholder ids (A1111 writes id 0) from `position` on.
    pub fixes: Vec<EmbeddingFix>,
}

/// Where a textual-inversion embedding goes in a [`TokenChunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingFix {
    /// First position of its vectors in the chunk's ids (the begin-of-text token is position 0).
    pub position: usize,
    /// Which embedding (the caller's index).
    pub embedding: usize,
    /// How many vectors (positions) it fills.
    pub vectors: usize,
}

/// An embedding named at a position of a token stream: which one, how many name tokens it covers
/// and how many vectors it puts in their place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingMatch {
    /// The caller's index of the embedding.
    pub embedding: usize,
    /// Tokens of its name that it replaces.
    pub name_tokens: usize,
    /// Vectors it contributes.
    pub vectors: usize,
}

/// The id A1111 puts where an embedding's vectors go (its vectors replace that id's embedding).
pub const EMBEDDING_PLACEHOLDER: u32 = 0;

/// Special token ids the chunker needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `<|startoftext|>`.
    pub bos: u32,
    /// `<|endoftext|>`.
    pub eos: u32,
    /// Padding (eos for OpenAI CLIP, `!` for OpenCLIP tokenizers).
    pub pad: u32,
    /// The `,` token, where A1111 prefers to cut a chunk that overflows.
    pub comma: Option<u32>,
}

/// How many tokens back from a chunk's end A1111 looks for a comma to cut at.
pub const COMMA_BACKTRACK: usize = 20;

/// Tokenizes parsed pieces into 77-token chunks the way A1111 does: 75 content tokens per chunk,
/// `BREAK` starts a new chunk, an overflowing chunk is cut after its last comma when that comma is
/// within [`COMMA_BACKTRACK`] tokens of the end. `tokenize` returns ids without bos/eos.
///
/// Each chunk is `[bos] + content + [eos]` padded with `pad`, so a plain prompt of ≤ 75 tokens gives
/// exactly the ids diffusers feeds the text encoder.
pub fn chunk_tokens<E>(
    parts: &[PromptPart],
    max_len: usize,
    special: SpecialTokens,
    tokenize: impl FnMut(&str) -> std::result::Result<Vec<u32>, E>,
) -> std::result::Result<Vec<TokenChunk>, E> {
    chunk_tokens_with_embeddings(parts, max_len, special, tokenize, |_, _| None)
}

/// [`chunk_tokens`] with textual-inversion embeddings, as A1111's `tokenize_line`: at each token,
/// `find(tokens, i)` may name an embedding whose name starts there; its name tokens are replaced by
/// one [`EMBEDDING_PLACEHOLDER`] per vector (weighted like the text around it), recorded as an
/// [`EmbeddingFix`], and an embedding that does not fit in what is left of a chunk starts the next one.
/// (Where a chunk overflows and its tail moves after a comma, the embeddings in the tail move with it;
/// A1111 leaves their vectors behind, which writes them over the old chunk's padding.)
pub fn chunk_tokens_with_embeddings<E>(
    parts: &[PromptPart],
    max_len: usize,
    special: SpecialTokens,
    mut tokenize: impl FnMut(&str) -> std::result::Result<Vec<u32>, E>,
    mut find: impl FnMut(&[u32], usize) -> Option<EmbeddingMatch>,
) -> std::result::Result<Vec<TokenChunk>, E> {
    let content = max_len.saturating_sub(2).max(1);
    let mut chunks = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    // Positions in `ids` (no begin-of-text yet).
    let mut fixes: Vec<EmbeddingFix> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let finish = |ids: &mut Vec<u32>, weights: &mut Vec<f32>, fixes: &mut Vec<EmbeddingFix>, chunks: &mut Vec<TokenChunk>| {
        let mut cid = Vec::with_capacity(max_len);
        let mut cw = Vec::with_capacity(max_len);
        cid.push(special.bos);
        cw.push(1.0);
        cid.append(ids);
        cw.append(weights);
        cid.push(special.eos);
        cw.push(1.0);
        cid.resize(max_len, special.pad);
        cw.resize(max_len, 1.0);
        let fixes = fixes.drain(..).map(|f| EmbeddingFix { position: f.position + 1, ..f }).collect();
        chunks.push(TokenChunk { ids: cid, weights: cw, fixes });
    };
    for part in parts {
        let (text, weight) = match part {
            PromptPart::Break => {
                finish(&mut ids, &mut weights, &mut fixes, &mut chunks);
                last_comma = None;
                continue;
            }
            PromptPart::Text { text, weight } => (text, *weight),
        };
        let tokens = tokenize(text)?;
        let mut pos = 0;
        while pos < tokens.len() {
            let token = tokens[pos];
            if Some(token) == special.comma {
                last_comma = Some(ids.len());
            } else if ids.len() == content {
                if let Some(c) = last_comma.filter(|&c| ids.len() - c <= COMMA_BACKTRACK) {
                    let moved_ids = ids.split_off(c + 1);
                    let moved_w = weights.split_off(c + 1);
                    let (kept, moved): (Vec<EmbeddingFix>, Vec<EmbeddingFix>) = fixes.drain(..).partition(|f| f.position <= c);
                    fixes = kept;
                    finish(&mut ids, &mut weights, &mut fixes, &mut chunks);
                    ids = moved_ids;
                    weights = moved_w;
                    fixes = moved.into_iter().map(|f| EmbeddingFix { position: f.position - (c + 1), ..f }).collect();
                    last_comma = None;
                }
            }
            if ids.len() == content {
                finish(&mut ids, &mut weights, &mut fixes, &mut chunks);
                last_comma = None;
            }
            match find(&tokens, pos) {
                None => {
                    ids.push(token);
                    weights.push(weight);
                    pos += 1;
                }
                Some(m) => {
                    if ids.len() + m.vectors > content {
                        finish(&mut ids, &mut weights, &mut fixes, &mut chunks);
                        last_comma = None;
                    }
                    fixes.push(EmbeddingFix { position: ids.len(), embedding: m.embedding, vectors: m.vectors });
                    ids.extend(std::iter::repeat_n(EMBEDDING_PLACEHOLDER, m.vectors));
                    weights.extend(std::iter::repeat_n(weight, m.vectors));
                    pos += m.name_tokens.max(1);
                }
            }
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        finish(&mut ids, &mut weights, &mut fixes, &mut chunks);
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out_of_the_prompt() -> Result<()> {
        let (text, loras) = extract_lora_tags("prompt", "a cat <lora:detail:0.8>, <LORA:style> in a < b <3 <lyco:x:te=0.5:unet=0.5>")?;
        assert_eq!(text, "a cat ,  in a < b <3 ");
        assert_eq!(
            loras,
            vec![
                PromptLora { name: "detail".into(), weight: 0.8, text_encoder_weight: 0.8 },
                PromptLora { name: "style".into(), weight: 1.0, text_encoder_weight: 1.0 },
                PromptLora { name: "x".into(), weight: 0.5, text_encoder_weight: 0.5 }
            ]
        );
        let (_, l) = extract_lora_tags("prompt", "<lora:a:-0.5:-0.5>")?;
        assert_eq!(l[0].weight, -0.5);
        // A1111: the first number is the text encoders' weight, the second the UNet's.
        let (_, l) = extract_lora_tags("prompt", "<lora:a:0.25:1.5> <lora:b:te=0:unet=0.7>")?;
        assert_eq!((l[0].text_encoder_weight, l[0].weight), (0.25, 1.5));
        assert_eq!((l[1].text_encoder_weight, l[1].weight), (0.0, 0.7));
        for bad in ["<lora::1>", "<lora:a:big>", "<lora:a:inf>", "<hypernet:h:1>", "<lora:a:1:dyn=4>", "<lora:a:1:1:1>"] {
            assert!(matches!(extract_lora_tags("prompt", bad), Err(Error::InvalidRequest { field: "prompt", .. })), "{bad}");
        }
        // Not tags: stays as written.
        for text in ["a < b > c", "<3", "<:x>", "x <lora:> y", "<a b:c>"] {
            assert_eq!(extract_lora_tags("prompt", text)?, (text.to_string(), vec![]), "{text}");
        }
        Ok(())
    }

    fn t(text: &str, weight: f32) -> PromptPart {
        PromptPart::Text { text: text.into(), weight }
    }

    fn p(prompt: &str) -> Vec<PromptPart> {
        parse_prompt_attention(prompt).expect("a valid prompt")
    }

    #[test]
    fn nesting_and_weights_are_bounded() {
        let deep = "(".repeat(MAX_PROMPT_NESTING) + "x";
        assert_eq!(p(&deep).len(), 1);
        let too_deep = "(".repeat(MAX_PROMPT_NESTING + 1) + "x";
        let e = parse_prompt_attention(&too_deep).unwrap_err().to_string();
        assert!(e.contains("nest more than 32"), "{e}");
        // Mixed kinds count together; closed brackets free their level.
        assert!(parse_prompt_attention(&"[(".repeat(17)).is_err());
        assert_eq!(p(&"(a)".repeat(10_000)), vec![t(&"a".repeat(10_000), 1.1)]);
        // 40 nines overflow f32 to infinity.
        let huge = format!("(a:{})", "9".repeat(40));
        for bad in [huge.as_str(), "(a:101)", "(a:-100.5)", "((a:100))", "(a:1e39)", "(a:1E-2 )", "(a: 2e+1)"] {
            let e = parse_prompt_attention(bad).unwrap_err().to_string();
            assert!(e.contains("±100"), "{bad}: {e}");
        }
        // Not a weight at all: stays text, as in A1111.
        close(&p("(a:1e)"), &[t("a:1e", 1.1)]);
        close(&p("x:1e39)"), &[t("x:1e39)", 1.0)]);
        close(&p("(a:100) (b:-100) (c:0)"), &[t("a", 100.0), t(" ", 1.0), t("b", -100.0), t(" ", 1.0), t("c", 0.0)]);
        // A weight that closes no bracket stays text as written, whatever its size.
        let literal = format!("a:{})", "9".repeat(40));
        close(&p(&literal), &[t(&literal, 1.0)]);
        close(&p("b:1.50 )"), &[t("b:1.50 )", 1.0)]);
    }

    #[test]
    fn validate_prompt_names_the_field() {
        validate_prompt("negative_prompt", "a (b:1.2) BREAK c").expect("valid");
        let e = validate_prompt("negative_prompt", &"x".repeat(MAX_PROMPT_BYTES + 1)).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "negative_prompt", .. }), "{e}");
        let e = validate_prompt("negative_prompt", &format!("(a:{})", "9".repeat(40))).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { field: "negative_prompt", .. }), "{e}");
        let breaks = vec!["a"; MAX_PROMPT_CHUNKS + 1].join(" BREAK ");
        let e = validate_prompt("prompt", &breaks).unwrap_err();
        assert!(e.to_string().contains("BREAK"), "{e}");
        validate_prompt("prompt", &vec!["a"; MAX_PROMPT_CHUNKS].join(" BREAK ")).expect("32 chunks are allowed");
    }

    fn close(parts: &[PromptPart], expected: &[PromptPart]) {
        assert_eq!(parts.len(), expected.len(), "{parts:?} vs {expected:?}");
        for (a, b) in parts.iter().zip(expected) {
            match (a, b) {
                (PromptPart::Text { text: ta, weight: wa }, PromptPart::Text { text: tb, weight: wb }) => {
                    assert_eq!(ta, tb);
                    assert!((wa - wb).abs() < 1e-6, "{ta}: {wa} vs {wb}");
                }
                (PromptPart::Break, PromptPart::Break) => {}
                _ => panic!("{a:?} vs {b:?}"),
            }
        }
    }

    // Cases from the A1111 `parse_prompt_attention` docstring.
    #[test]
    fn a1111_examples() {
        close(&p("normal text"), &[t("normal text", 1.0)]);
        close(&p("an (important) word"), &[t("an ", 1.0), t("important", 1.1), t(" word", 1.0)]);
        close(&p("(unbalanced"), &[t("unbalanced", 1.1)]);
        close(&p("\\(literal\\]"), &[t("(literal]", 1.0)]);
        close(&p("(unnecessary)(parens)"), &[t("unnecessaryparens", 1.1)]);
        close(
            &p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                t("a ", 1.0),
                t("house", 1.5730),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641),
                t(".", 1.1),
            ],
        );
        close(&p(""), &[t("", 1.0)]);
        close(&p("[faded]"), &[t("faded", 1.0 / 1.1)]);
        close(&p("a:b (c:x)"), &[t("a:b ", 1.0), t("c:x", 1.1)]);
    }

    #[test]
    fn break_splits() {
        close(&p("a cat BREAK a dog"), &[t("a cat", 1.0), PromptPart::Break, t("a dog", 1.0)]);
        // BREAK inside a word is not a break.
        close(&p("BREAKFAST"), &[t("BREAKFAST", 1.0)]);
    }

    const SP: SpecialTokens = SpecialTokens { bos: 100, eos: 101, pad: 0, comma: Some(7) };

    fn words(s: &str) -> std::result::Result<Vec<u32>, ()> {
        Ok(s.split_whitespace().map(|w| w.parse::<u32>().unwrap_or(9)).collect())
    }

    #[test]
    fn short_prompt_is_one_diffusers_layout_chunk() {
        let c = chunk_tokens(&[t("1 2 3", 1.0)], 8, SP, words).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].ids, vec![100, 1, 2, 3, 101, 0, 0, 0]);
        assert_eq!(c[0].weights, vec![1.0; 8]);
    }

    #[test]
    fn long_prompt_chunks_at_content_length() {
        // max_len 5 → 3 content tokens per chunk.
        let c = chunk_tokens(&[t("1 2 3 4 5", 1.0), t("6", 2.0)], 5, SP, words).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids, vec![100, 1, 2, 3, 101]);
        assert_eq!(c[1].ids, vec![100, 4, 5, 6, 101]);
        assert_eq!(c[1].weights, vec![1.0, 1.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn overflow_cuts_after_last_comma() {
        // content 4: "1 , 2 3" fills the chunk; "4" overflows, so the chunk is cut after the comma.
        let c = chunk_tokens(&[t("1 7 2 3 4", 1.0)], 6, SP, words).unwrap();
        assert_eq!(c[0].ids, vec![100, 1, 7, 101, 0, 0]);
        assert_eq!(c[1].ids, vec![100, 2, 3, 4, 101, 0]);
    }

    #[test]
    fn break_and_empty() {
        let c = chunk_tokens(&[t("1", 1.0), PromptPart::Break, t("2", 1.0)], 5, SP, words).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].ids, vec![100, 2, 101, 0, 0]);
        let e = chunk_tokens(&[t("", 1.0)], 5, SP, words).unwrap();
        assert_eq!(e, vec![TokenChunk { ids: vec![100, 101, 0, 0, 0], weights: vec![1.0; 5], fixes: vec![] }]);
    }
}
