//! A1111 prompt editing `[from:to:when]` and alternation `[a|b]`: which prompt text conditions which
//! model call.
//!
//! [`prompt_schedule`] gives what A1111's `get_learned_conditioning_prompt_schedules` gives (its default
//! scheduling, not the "old" one): a list of `(end_at_step, text)`, one text per distinct stretch of steps,
//! with the bracket syntax resolved and everything else (attention weights, `BREAK`) left for the prompt
//! encoder. [`schedule_index`] is A1111's lookup of the entry for a model call. The grammar is A1111's
//! (a Lark grammar); prompts it cannot parse — an unmatched `|`, a trailing backslash — are one
//! stretch of literal text, as in A1111.

/// One stretch of a prompt schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPrompt {
    /// The last model call (counted from 0 in the pass) this text conditions, inclusive.
    pub end_at_step: usize,
    /// The prompt text for those calls.
    pub text: String,
}

/// Deepest bracket nesting the schedule parser follows; deeper constructs stay literal (requests are
/// refused long before, at `MAX_PROMPT_NESTING`).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    /// `[before:after:when]`; `when` is the number as written, turned into a step by [`when_step`].
    Scheduled { before: Option<Vec<Node>>, after: Vec<Node>, when: String },
    Alternate(Vec<Vec<Node>>),
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    /// Positions where a bracket construct was found not to parse (the grammar is context free
    /// inside brackets, so it never will).
    failed: std::collections::HashSet<usize>,
    /// Every construct parsed, by its end (exclusive): its start and whether it is a `scheduled` one.
    spans: std::collections::HashMap<usize, (usize, Shape)>,
    /// Top-level brackets read as stray characters although a construct parses there (see [`Parser::resolve`]).
    forced: std::collections::HashSet<usize>,
}

/// What kind of construct a span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Emphasized,
    Scheduled,
    Alternate,
}

/// One item of the top level: a stray `[`, `]`, `(`, `)` or `:`, a construct (its span), or text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    Stray,
    Construct(usize, usize),
    Text,
}

fn is_delimiter(c: u8) -> bool {
    matches!(c, b'\\' | b'[' | b']' | b'(' | b')' | b':' | b'|')
}

impl<'a> Parser<'a> {
    fn at(&self, pos: usize) -> Option<u8> {
        self.s.get(pos).copied()
    }

    /// A1111's `prompt` rule from `pos`: plain text, whitespace and bracket constructs, up to the first
    /// byte that cannot continue it. Returns the nodes and where it stopped.
    fn prompt(&mut self, mut pos: usize, depth: usize) -> (Vec<Node>, usize) {
        let mut nodes = Vec::new();
        while let Some(c) = self.at(pos) {
            if matches!(c, b'(' | b'[') {
                let Some((node, end)) = self.construct(pos, depth + 1) else { break };
                nodes.extend(node);
                pos = end;
            } else {
                let end = self.plain(pos);
                if end == pos {
                    break;
                }
                push_text(&mut nodes, &self.text[pos..end]);
                pos = end;
            }
        }
        (nodes, pos)
    }

    /// The end of the plain text from `pos`: A1111's `plain` rule, `([^\\\[\]():|]|\\.)+` — anything
    /// but the syntax's characters, and a backslash with the character after it (UTF-8 included), kept
    /// as written. `pos` itself when none starts there (a trailing backslash is none).
    fn plain(&self, mut pos: usize) -> usize {
        while let Some(c) = self.at(pos) {
            if c == b'\\' {
                let Some(next) = self.text[pos + 1..].chars().next() else { break };
                pos += 1 + next.len_utf8();
            } else if is_delimiter(c) {
                break;
            } else {
                pos += 1;
            }
        }
        pos
    }

    /// An `emphasized`, `scheduled` or `alternate` construct at `pos` (a `(` or `[`).
    fn construct(&mut self, pos: usize, depth: usize) -> Option<(Vec<Node>, usize)> {
        if depth > MAX_DEPTH || self.failed.contains(&pos) {
            return None;
        }
        let parsed = if self.at(pos) == Some(b'(') { self.round(pos, depth) } else { self.square(pos, depth) };
        match &parsed {
            None => {
                self.failed.insert(pos);
            }
            Some((nodes, end)) => {
                let shape = match nodes.as_slice() {
                    [Node::Scheduled { .. }] => Shape::Scheduled,
                    [Node::Alternate(_)] => Shape::Alternate,
                    _ => Shape::Emphasized,
                };
                self.spans.insert(*end, (pos, shape));
            }
        }
        parsed
    }

    /// `"(" prompt ")"` or `"(" prompt ":" prompt ")"`: kept as written, with what is inside resolved.
    fn round(&mut self, pos: usize, depth: usize) -> Option<(Vec<Node>, usize)> {
        let (inner, p) = self.prompt(pos + 1, depth);
        let mut out = vec![Node::Text("(".into())];
        out.extend(inner);
        match self.at(p)? {
            b')' => {
                out.push(Node::Text(")".into()));
                Some((out, p + 1))
            }
            b':' => {
                let (second, q) = self.prompt(p + 1, depth);
                (self.at(q)? == b')').then_some(())?;
                out.push(Node::Text(":".into()));
                out.extend(second);
                out.push(Node::Text(")".into()));
                Some((out, q + 1))
            }
            _ => None,
        }
    }

    /// `"[" prompt "]"`, `"[" prompt ("|" prompt?)+ "]"` or `"[" (prompt ":")? prompt ":" NUMBER "]"`.
    fn square(&mut self, pos: usize, depth: usize) -> Option<(Vec<Node>, usize)> {
        let (first, p) = self.prompt(pos + 1, depth);
        match self.at(p)? {
            b']' => {
                let mut out = vec![Node::Text("[".into())];
                out.extend(first);
                out.push(Node::Text("]".into()));
                Some((out, p + 1))
            }
            b'|' => {
                let mut options = vec![first];
                let mut p = p;
                while self.at(p) == Some(b'|') {
                    let (next, q) = self.prompt(p + 1, depth);
                    options.push(next);
                    p = q;
                }
                (self.at(p)? == b']').then_some(())?;
                Some((vec![Node::Alternate(options)], p + 1))
            }
            b':' => {
                if let Some((when, end)) = self.when_close(p + 1) {
                    return Some((vec![Node::Scheduled { before: None, after: first, when }], end));
                }
                let (after, q) = self.prompt(p + 1, depth);
                (self.at(q)? == b':').then_some(())?;
                let (when, end) = self.when_close(q + 1)?;
                Some((vec![Node::Scheduled { before: Some(first), after, when }], end))
            }
            _ => None,
        }
    }

    /// `[WHITESPACE] NUMBER [WHITESPACE] "]"` from `pos`: the number as written and the end.
    fn when_close(&self, pos: usize) -> Option<(String, usize)> {
        let pos = self.skip_whitespace(pos);
        let len = signed_number_len(&self.s[pos..])?;
        let number = self.text[pos..pos + len].to_string();
        let end = self.skip_whitespace(pos + len);
        (self.at(end)? == b']').then_some((number, end + 1))
    }

    /// Past Lark's `WHITESPACE` (`\s+`, Unicode whitespace as Python's `re` reads it).
    fn skip_whitespace(&self, pos: usize) -> usize {
        let ws: usize = self.text[pos..].chars().take_while(|c| c.is_whitespace()).map(char::len_utf8).sum();
        pos + ws
    }

    /// A1111's `start` rule over the whole prompt: prompts with stray `[`, `]`, `(`, `)` and `:`
    /// between them, and the top-level items. `None` where it cannot parse (a `|` outside
    /// alternation, a trailing backslash).
    fn start(&mut self) -> Option<(Vec<Node>, Vec<Top>)> {
        let mut nodes = Vec::new();
        let mut top = Vec::new();
        let mut pos = 0;
        loop {
            // Top-level prompts, item by item, so constructs keep their spans.
            while let Some(c) = self.at(pos) {
                if matches!(c, b'(' | b'[') {
                    if self.forced.contains(&pos) {
                        break;
                    }
                    match self.construct(pos, 1) {
                        Some((part, end)) => {
                            nodes.extend(part);
                            top.push(Top::Construct(pos, end));
                            pos = end;
                        }
                        None => break,
                    }
                } else {
                    let end = self.plain(pos);
                    if end == pos {
                        break;
                    }
                    push_text(&mut nodes, &self.text[pos..end]);
                    top.push(Top::Text);
                    pos = end;
                }
            }
            match self.at(pos) {
                None => return Some((nodes, top)),
                Some(c @ (b'[' | b']' | b'(' | b')' | b':')) => {
                    push_text(&mut nodes, &(c as char).to_string());
                    top.push(Top::Stray);
                    pos += 1;
                }
                Some(_) => return None,
            }
        }
    }

    /// Closing characters from the end of the construct `[start, end)` down to a `scheduled` construct
    /// that ends with it (`[a:1]` → 1, `([a:1])` → 2), or `None` when none does: only then can reading
    /// the construct as stray characters change the text.
    fn chain_to_scheduled(&self, start: usize, end: usize) -> Option<usize> {
        let &(s, shape) = self.spans.get(&end)?;
        if s != start {
            return None;
        }
        match shape {
            Shape::Scheduled => Some(1),
            Shape::Alternate => None,
            Shape::Emphasized => {
                let &(inner, _) = self.spans.get(&(end - 1))?;
                (inner > start).then_some(())?;
                self.chain_to_scheduled(inner, end - 1).map(|n| n + 1)
            }
        }
    }

    /// The parse Lark's Earley parser picks (`ambiguity='resolve'`) where the grammar is ambiguous: a
    /// top-level construct followed by stray characters can also be read as stray characters itself, and
    /// Lark takes that reading when the run of stray characters it then ends in (the construct's closing
    /// brackets down to a `scheduled` one, plus the strays after it) has odd length. Measured against
    /// Lark on A1111's grammar (fixtures/prompts/a1111_schedules.json); it only arises when an editing
    /// construct is directly followed by stray brackets or colons.
    fn resolve(&mut self) -> Option<Vec<Node>> {
        // Each round reads one more construct as strays; a prompt has at most one per byte.
        for _ in 0..=self.s.len() {
            let (nodes, top) = self.start()?;
            let mut broken = None;
            for (i, item) in top.iter().enumerate().rev() {
                let Top::Construct(start, end) = *item else { continue };
                let strays = top[i + 1..].iter().take_while(|t| **t == Top::Stray).count();
                if strays == 0 {
                    continue;
                }
                if let Some(chain) = self.chain_to_scheduled(start, end) {
                    if (strays + chain) % 2 == 1 {
                        broken = Some(start);
                        break;
                    }
                }
            }
            match broken {
                Some(start) => {
                    self.forced.insert(start);
                }
                None => return Some(nodes),
            }
        }
        None
    }
}

fn push_text(nodes: &mut Vec<Node>, s: &str) {
    match nodes.last_mut() {
        Some(Node::Text(t)) => t.push_str(s),
        _ => nodes.push(Node::Text(s.to_string())),
    }
}

/// Length of a Lark `SIGNED_NUMBER` at the start of `b` (`[+-]` then `123`, `1.5`, `.5`, `5.`, with an
/// optional exponent; an exponent alone after digits, `1e3`, counts too).
fn signed_number_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let int = digits(i);
    i += int;
    if b.get(i) == Some(&b'.') {
        let frac = digits(i + 1);
        if int == 0 && frac == 0 {
            return None;
        }
        i += 1 + frac;
    } else if int == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp = digits(j);
        if exp > 0 {
            i = j + exp;
        }
    }
    Some(i)
}

/// The step a `when` number stands for: written with a `.`, a fraction of the pass (for a hires pass,
/// of both passes: `1.5` is half-way through the second); otherwise an absolute step (in a hires pass,
/// counted from the start of the first). Clamped to `steps`, truncated toward zero as Python's `int`.
fn when_step(when: &str, steps: usize, offsets: (f64, f64)) -> i64 {
    let v: f64 = when.parse().unwrap_or(f64::INFINITY);
    let (int_offset, flt_offset) = offsets;
    let v = if when.contains('.') { (v - flt_offset) * steps as f64 } else { v - int_offset };
    // A1111's int() of an infinite value raises; a value that large means "never" within the pass.
    if !v.is_finite() || v >= steps as f64 {
        return steps as i64;
    }
    if v <= i64::MIN as f64 {
        return i64::MIN;
    }
    v.trunc() as i64
}

fn collect_steps(nodes: &[Node], steps: usize, offsets: (f64, f64), out: &mut std::collections::BTreeSet<usize>) {
    for n in nodes {
        match n {
            Node::Text(_) => {}
            Node::Scheduled { before, after, when } => {
                let w = when_step(when, steps, offsets);
                if w >= 1 {
                    out.insert(w as usize);
                }
                if let Some(b) = before {
                    collect_steps(b, steps, offsets, out);
                }
                collect_steps(after, steps, offsets, out);
            }
            Node::Alternate(options) => {
                out.extend(1..=steps);
                for o in options {
                    collect_steps(o, steps, offsets, out);
                }
            }
        }
    }
}

fn text_at(nodes: &[Node], step: usize, steps: usize, offsets: (f64, f64), out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Scheduled { before, after, when } => {
                if (step as i64) <= when_step(when, steps, offsets) {
                    if let Some(b) = before {
                        text_at(b, step, steps, offsets, out);
                    }
                } else {
                    text_at(after, step, steps, offsets, out);
                }
            }
            Node::Alternate(options) => text_at(&options[(step.max(1) - 1) % options.len()], step, steps, offsets, out),
        }
    }
}

/// The prompt texts of a pass and the model calls each conditions, as A1111 computes them.
///
/// `base_steps` is the first pass's schedule length; for a hires fix's second pass, `hires_steps` is its
/// own (then whole numbers count from the start of the first pass and fractions above 1 reach into the
/// second). A1111 schedules over *model calls*: pass a second-order sampler's steps doubled (see
/// [`crate::schedulers::SamplerKind::schedule_steps`]). A prompt without editing syntax is one entry.
pub fn prompt_schedule(prompt: &str, base_steps: usize, hires_steps: Option<usize>) -> Vec<ScheduledPrompt> {
    let (steps, offsets) = match hires_steps {
        None => (base_steps, (0.0, 0.0)),
        Some(h) => (h, (base_steps as f64, 1.0)),
    };
    let mut parser =
        Parser { s: prompt.as_bytes(), text: prompt, failed: Default::default(), spans: Default::default(), forced: Default::default() };
    let Some(tree) = parser.resolve() else {
        return vec![ScheduledPrompt { end_at_step: steps, text: prompt.to_string() }];
    };
    let mut ends = std::collections::BTreeSet::from([steps]);
    collect_steps(&tree, steps, offsets, &mut ends);
    ends.into_iter()
        .map(|t| {
            let mut text = String::new();
            text_at(&tree, t, steps, offsets, &mut text);
            ScheduledPrompt { end_at_step: t, text }
        })
        .collect()
}

/// The entry for model call `call` (0-based within the pass) of a schedule whose entries end at `ends`:
/// the first that ends at or after it, or — as A1111's `reconstruct_cond_batch` — the first entry when
/// every one has ended.
pub fn schedule_index(ends: impl IntoIterator<Item = usize>, call: usize) -> usize {
    ends.into_iter().position(|end| call <= end).unwrap_or(0)
}

/// Most `AND` parts a prompt may have: each is one more UNet batch row per image and step.
pub const MAX_AND_PARTS: usize = 8;

/// Checks a prompt's composable-diffusion parts: at most [`MAX_AND_PARTS`], weights finite and within
/// ±[`crate::prompt::MAX_PROMPT_WEIGHT`]; errors name `field`.
pub fn check_and_parts(field: &'static str, prompt: &str) -> crate::Result<()> {
    let parts = split_and(prompt);
    if parts.len() > MAX_AND_PARTS {
        return Err(crate::Error::invalid(field, format!("{} AND parts; at most {MAX_AND_PARTS} (each one is another UNet pass per step)", parts.len())));
    }
    let max = f64::from(crate::prompt::MAX_PROMPT_WEIGHT);
    if let Some((_, w)) = parts.iter().find(|(_, w)| !w.is_finite() || w.abs() > max) {
        return Err(crate::Error::invalid(field, format!("an AND part's weight {w} is outside ±{max}")));
    }
    Ok(())
}

/// A1111's composable diffusion: the prompt split at every whole word `AND` (as its `\bAND\b`), each
/// part with the weight an optional trailing `:number` gives (1 when absent, the `:number` removed), as
/// A1111's `get_multicond_prompt_list` does. A prompt without `AND` is one part, its text unchanged unless
/// it ends in `:number`.
pub fn split_and(prompt: &str) -> Vec<(String, f64)> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let chars: Vec<(usize, char)> = prompt.char_indices().collect();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 2 < chars.len() {
        let (at, c) = chars[i];
        let is_and = c == 'A' && chars[i + 1].1 == 'N' && chars[i + 2].1 == 'D';
        let before_ok = i == 0 || !word(chars[i - 1].1);
        let after_ok = chars.get(i + 3).is_none_or(|&(_, c)| !word(c));
        if is_and && before_ok && after_ok {
            parts.push(&prompt[start..at]);
            start = chars.get(i + 3).map_or(prompt.len(), |&(j, _)| j);
            i += 3;
        } else {
            i += 1;
        }
    }
    parts.push(&prompt[start..]);
    parts.into_iter().map(weighted).collect()
}

/// A1111's `re_weight`: `text` then an optional `:` number at the very end (spaces around allowed); the
/// text loses its trailing whitespace either way.
fn weighted(part: &str) -> (String, f64) {
    let trimmed = part.trim_end();
    if let Some(colon) = trimmed.rfind(':') {
        let number = trimmed[colon + 1..].trim_start();
        let digits = number.strip_prefix(['+', '-']).unwrap_or(number);
        // `\d+\.?` or `\d*\.\d+`: digits with at most one dot, at least one digit.
        let valid = !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && digits.matches('.').count() <= 1
            && digits.chars().any(|c| c.is_ascii_digit());
        if valid {
            if let Ok(w) = number.parse::<f64>() {
                return (trimmed[..colon].trim_end().to_string(), w);
            }
        }
    }
    // The lazy text group leaves trailing whitespace to the pattern's final `\s*`.
    (trimmed.to_string(), 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(prompt: &str) -> Vec<(usize, String)> {
        prompt_schedule(prompt, 10, None).into_iter().map(|e| (e.end_at_step, e.text)).collect()
    }

    fn alternating(a: &str, b: &str) -> Vec<(usize, String)> {
        (1..=10).map(|i| (i, if i % 2 == 1 { a } else { b }.to_string())).collect()
    }

    /// The examples in the docstring of A1111's `get_learned_conditioning_prompt_schedules`
    /// (AUTOMATIC1111/stable-diffusion-webui, modules/prompt_parser.py, v1.6 and later).
    #[test]
    fn a1111_docstring_examples() {
        let s = |v: &[(usize, &str)]| v.iter().map(|(n, t)| (*n, t.to_string())).collect::<Vec<_>>();
        assert_eq!(g("test"), s(&[(10, "test")]));
        assert_eq!(g("a [b:3]"), s(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [b: 3]"), s(&[(3, "a "), (10, "a b")]));
        assert_eq!(g("a [[[b]]:2]"), s(&[(2, "a "), (10, "a [[b]]")]));
        assert_eq!(g("[(a:2):3]"), s(&[(3, ""), (10, "(a:2)")]));
        assert_eq!(g("a [b : c : 1] d"), s(&[(1, "a b  d"), (10, "a  c  d")]));
        assert_eq!(g("a[b:[c:d:2]:1]e"), s(&[(1, "abe"), (2, "ace"), (10, "ade")]));
        assert_eq!(g("a [unbalanced"), s(&[(10, "a [unbalanced")]));
        assert_eq!(g("a [b:.5] c"), s(&[(5, "a  c"), (10, "a b c")]));
        assert_eq!(g("((a][:b:c [d:3]"), s(&[(3, "((a][:b:c "), (10, "((a][:b:c d")]));
        assert_eq!(g("[a|(b:1.1)]"), alternating("a", "(b:1.1)"));
        assert_eq!(g("[fe|]male"), alternating("female", "male"));
        let four: Vec<(usize, String)> = (1..=10).map(|i| (i, if i % 4 == 1 { "female" } else { "male" }.to_string())).collect();
        assert_eq!(g("[fe|||]male"), four);
        let h = |p: &str| prompt_schedule(p, 10, Some(10)).into_iter().map(|e| (e.end_at_step, e.text)).collect::<Vec<_>>();
        assert_eq!(h("a [b:.5] c"), s(&[(10, "a b c")]));
        assert_eq!(h("a [b:1.5] c"), s(&[(5, "a  c"), (10, "a b c")]));
    }

    #[test]
    fn lookups_follow_reconstruct_cond_batch() {
        let s = prompt_schedule("[a:b:3]", 10, None);
        let ends = || s.iter().map(|e| e.end_at_step);
        assert_eq!((0..=10).map(|c| schedule_index(ends(), c)).collect::<Vec<_>>(), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(schedule_index(ends(), 11), 0, "past the end: the first entry, as A1111");
    }

    #[test]
    fn hostile_prompts_parse_in_bounded_time() {
        let deep = "[".repeat(20_000) + &"]".repeat(5);
        assert_eq!(prompt_schedule(&deep, 10, None).len(), 1);
        let many = "[a|".repeat(5_000);
        assert_eq!(prompt_schedule(&many, 10, None)[0].text, many, "a | outside alternation: literal");
        let big = "[a:b:1e400]";
        assert_eq!(prompt_schedule(big, 10, None), vec![ScheduledPrompt { end_at_step: 10, text: "a".into() }]);
    }

    #[test]
    fn and_splits_as_a1111_composable_diffusion() {
        let parts = |p: &str| split_and(p);
        assert_eq!(parts("a cat"), vec![("a cat".to_string(), 1.0)]);
        assert_eq!(parts("a cat AND a dog "), vec![("a cat".to_string(), 1.0), (" a dog".to_string(), 1.0)]);
        assert_eq!(parts("a cat :1.5 AND a dog:0.5"), vec![("a cat".to_string(), 1.5), (" a dog".to_string(), 0.5)]);
        assert_eq!(parts("ANDROID AND BAND and sand"), vec![("ANDROID".to_string(), 1.0), (" BAND and sand".to_string(), 1.0)]);
        assert_eq!(parts("x:-2"), vec![("x".to_string(), -2.0)]);
        assert_eq!(parts("x: .5"), vec![("x".to_string(), 0.5)]);
        assert_eq!(parts("x:3."), vec![("x".to_string(), 3.0)]);
        // Not a trailing weight: kept as text (A1111 would send it to CLIP as written).
        assert_eq!(parts("(a:1.2) b"), vec![("(a:1.2) b".to_string(), 1.0)]);
        assert_eq!(parts("a:1.2.3"), vec![("a:1.2.3".to_string(), 1.0)]);
        assert_eq!(parts("AND"), vec![("".to_string(), 1.0), ("".to_string(), 1.0)]);
        assert_eq!(parts("é AND_x ANDé (AND)"), vec![("é AND_x ANDé (".to_string(), 1.0), (")".to_string(), 1.0)]);
        assert!(check_and_parts("prompt", &["a"; MAX_AND_PARTS].join(" AND ")).is_ok());
        assert!(check_and_parts("prompt", &["a"; MAX_AND_PARTS + 1].join(" AND ")).is_err());
        assert!(check_and_parts("prompt", "a:1000 AND b").is_err());
    }
}
