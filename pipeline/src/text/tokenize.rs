//! CLIP tokenisation as sd-scripts does it: BPE ids, `--max_token_length` chunking and the
//! A1111 weighted-caption syntax (`--weighted_captions`).
//!
//! The byte-level BPE itself is the `tokenizers` crate, configured like Hugging Face's CLIP
//! tokenizer (NFC, whitespace runs collapsed, lower case, CLIP's word-splitting pattern,
//! `</w>` end-of-word suffix) and built from the `vocab.json` + `merges.txt` of a model folder,
//! or from the standard CLIP vocabulary built into lorakit.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{infra::hashing, Error, Result};

/// Positions of one CLIP chunk: BOS + 75 body tokens + EOS/pad.
pub const CHUNK_LEN: usize = 77;
/// Body tokens per chunk.
pub const CHUNK_BODY: usize = CHUNK_LEN - 2;
/// CLIP's beginning-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also the unknown token, and SD1's padding).
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// CLIP's word-splitting pattern (the words BPE runs on).
const CLIP_WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Which id fills the positions after EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Pad with EOS (SD1.x, SDXL encoder 1).
    Eos,
    /// Pad with id 0, `!` (SD2.x, SDXL encoder 2); chunk ends get sd-scripts' EOS fix-ups.
    Zero,
}

/// `--max_token_length`: 75 (one chunk, the default), 150 or 225 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxTokenLength(usize);

impl MaxTokenLength {
    /// Checks a `--max_token_length` value.
    pub fn new(tokens: usize) -> Result<Self> {
        match tokens {
            75 | 150 | 225 => Ok(MaxTokenLength(tokens)),
            other => Err(Error::Usage(format!(
                "--max_token_length must be 75, 150 or 225, not {other}"
            ))),
        }
    }

    /// Number of 77-id chunks.
    pub fn chunks(self) -> usize {
        self.0 / CHUNK_BODY
    }

    /// The token budget (75, 150 or 225).
    pub fn tokens(self) -> usize {
        self.0
    }

    /// Length of the stitched hidden-state sequence: `75n + 2`.
    pub fn sequence_len(self) -> usize {
        self.0 + 2
    }
}

impl Default for MaxTokenLength {
    fn default() -> Self {
        MaxTokenLength(CHUNK_BODY)
    }
}

/// Token ids of one caption, split into `n` chunks of 77 (row-major `[n, 77]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunks {
    /// `n * 77` ids.
    pub ids: Vec<u32>,
    /// Per-id weights (1.0 except in weighted captions), same layout as `ids`.
    pub weights: Vec<f32>,
    /// True when the caption had more tokens than `--max_token_length` and was cut.
    pub truncated: bool,
}

impl TokenChunks {
    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.ids.len() / CHUNK_LEN
    }

    /// Weights of the body positions in stitched order (`75n` values: positions 1..=75 of
    /// each chunk), as multiplied into the stitched hidden states.
    pub fn body_weights(&self) -> Vec<f32> {
        self.weights
            .chunks(CHUNK_LEN)
            .flat_map(|chunk| chunk[1..CHUNK_LEN - 1].iter().copied())
            .collect()
    }

    /// True when every weight is 1 (plain captions).
    pub fn is_unweighted(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }
}

/// A CLIP BPE tokenizer plus the ids sd-scripts frames captions with.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    padding: Padding,
    files_hash: String,
}

/// The standard CLIP BPE vocabulary (`openai/clip-vit-large-patch14`, 49408 entries), used when
/// a model brings no tokenizer: SD1, SD2 and both SDXL encoders share it.
const BUILT_IN_VOCAB: &[u8] = include_bytes!("../../assets/clip-tokenizer/vocab.json");
/// The merges of [`BUILT_IN_VOCAB`].
const BUILT_IN_MERGES: &[u8] = include_bytes!("../../assets/clip-tokenizer/merges.txt");

/// Where a CLIP tokenizer's `vocab.json` and `merges.txt` come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A tokenizer folder.
    Folder(PathBuf),
    /// The vocabulary built into lorakit.
    BuiltIn,
}

impl TokenizerSource {
    /// The folder, or `built-in CLIP vocabulary`.
    pub fn describe(&self) -> String {
        match self {
            TokenizerSource::Folder(dir) => dir.display().to_string(),
            TokenizerSource::BuiltIn => "built-in CLIP vocabulary".into(),
        }
    }
}

impl ClipTokenizer {
    /// Builds the tokenizer from a folder's `vocab.json` and `merges.txt`, or the built-in ones.
    pub fn open(source: &TokenizerSource, padding: Padding) -> Result<Self> {
        match source {
            TokenizerSource::Folder(dir) => Self::from_dir(dir, padding),
            TokenizerSource::BuiltIn => Self::from_bytes(
                BUILT_IN_VOCAB,
                BUILT_IN_MERGES,
                Path::new("built-in CLIP vocabulary"),
                padding,
            ),
        }
    }

    /// Builds the tokenizer from `dir/vocab.json` and `dir/merges.txt`.
    pub fn from_dir(dir: &Path, padding: Padding) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(Error::bad_file(
                    file,
                    "CLIP tokenizer file not found; pass --tokenizer DIR with the vocab.json and \
                     merges.txt of the model (the `tokenizer/` folder of a diffusers model)",
                ));
            }
        }
        Self::from_bytes(
            &crate::infra::fsio::read(&vocab)?,
            &crate::infra::fsio::read(&merges)?,
            &vocab,
            padding,
        )
    }

    /// Builds the tokenizer from the bytes of `vocab.json` and `merges.txt`; `origin` names them
    /// in errors.
    fn from_bytes(vocab: &[u8], merges: &[u8], origin: &Path, padding: Padding) -> Result<Self> {
        let files_hash = hashing::KeyBuilder::new("clip-tokenizer", 1)
            .text("vocab", blake3::hash(vocab).to_hex().as_str())
            .text("merges", blake3::hash(merges).to_hex().as_str())
            .finish();
        let bad = |message: String| Error::bad_file(origin, message);
        let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(vocab)
            .map_err(|e| bad(format!("vocab.json is not a JSON object: {e}")))?;
        let vocab_map: tokenizers::models::bpe::Vocab = entries
            .into_iter()
            .map(|(token, id)| {
                let id = id.as_u64().and_then(|id| u32::try_from(id).ok());
                id.map(|id| (token.clone(), id))
                    .ok_or_else(|| bad(format!("vocab.json: the id of {token:?} is not a number")))
            })
            .collect::<Result<_>>()?;
        let merges_text =
            std::str::from_utf8(merges).map_err(|_| bad("merges.txt is not UTF-8 text".into()))?;
        let merge_list: tokenizers::models::bpe::Merges = merges_text
            .lines()
            .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merges.txt: line {line:?} is not `a b`")))
            })
            .collect::<Result<_>>()?;
        let model = BPE::builder()
            .vocab_and_merges(vocab_map, merge_list)
            .unk_token(EOS_TOKEN.to_string())
            .end_of_word_suffix("</w>".to_string())
            .continuing_subword_prefix(String::new())
            .build()
            .map_err(|e| bad(format!("cannot build the CLIP BPE: {e}")))?;
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .expect("valid whitespace pattern")
            .into(),
            Lowercase.into(),
        ]);
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_WORD_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .expect("valid CLIP word pattern")
            .into(),
            ByteLevel::new(false, true, false).into(),
        ]);
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| Error::Model(format!("tokenizer setup: {e}")))?;
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner
            .add_special_tokens([
                AddedToken::from(BOS_TOKEN, true),
                AddedToken::from(EOS_TOKEN, true),
            ])
            .map_err(|e| Error::Model(format!("tokenizer setup: {e}")))?;
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| bad(format!("vocabulary has no {token}; not a CLIP tokenizer")))
        };
        let bos = id(BOS_TOKEN)?;
        let eos = id(EOS_TOKEN)?;
        let pad = match padding {
            Padding::Eos => eos,
            Padding::Zero => 0,
        };
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad,
            padding,
            files_hash,
        })
    }

    /// Hash of the vocabulary and merges files (part of every text-encoder cache key).
    pub fn files_hash(&self) -> &str {
        &self.files_hash
    }

    /// The id of EOS.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The padding rule.
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// BPE ids of `text` without BOS/EOS.
    pub fn body_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Model(format!("tokenizing {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// sd-scripts' `tokenize`: ids of `text`, cut to the budget and split into chunks.
    pub fn tokenize(&self, text: &str, max_len: MaxTokenLength) -> Result<TokenChunks> {
        let body = self.body_ids(text)?;
        let weights = vec![1.0; body.len()];
        Ok(self.frame(body, weights, max_len))
    }

    /// sd-scripts' `tokenize_with_weights`: the A1111 attention syntax parsed, each fragment
    /// tokenised on its own, weights attached to its tokens.
    pub fn tokenize_weighted(&self, text: &str, max_len: MaxTokenLength) -> Result<TokenChunks> {
        let mut body = Vec::new();
        let mut weights = Vec::new();
        for (fragment, weight) in parse_prompt_attention(text) {
            let ids = self.body_ids(&fragment)?;
            weights.extend(std::iter::repeat_n(weight as f32, ids.len()));
            body.extend(ids);
        }
        Ok(self.frame(body, weights, max_len))
    }

    /// BOS + body (cut to the budget) + EOS + padding, then chunked with sd-scripts' fix-ups.
    fn frame(
        &self,
        mut body: Vec<u32>,
        mut weights: Vec<f32>,
        max_len: MaxTokenLength,
    ) -> TokenChunks {
        let truncated = body.len() > max_len.tokens();
        body.truncate(max_len.tokens());
        weights.truncate(max_len.tokens());
        let total = max_len.sequence_len();
        let mut full = Vec::with_capacity(total);
        full.push(self.bos);
        full.extend_from_slice(&body);
        full.push(self.eos);
        full.resize(total, self.pad);
        let mut full_weights = Vec::with_capacity(total);
        full_weights.push(1.0);
        full_weights.extend_from_slice(&weights);
        full_weights.resize(total, 1.0);

        let mut ids = Vec::with_capacity(max_len.chunks() * CHUNK_LEN);
        let mut chunk_weights = Vec::with_capacity(ids.capacity());
        for chunk in 0..max_len.chunks() {
            let body_range = 1 + CHUNK_BODY * chunk..1 + CHUNK_BODY * (chunk + 1);
            let start = ids.len();
            ids.push(full[0]);
            ids.extend_from_slice(&full[body_range.clone()]);
            ids.push(full[total - 1]);
            chunk_weights.push(1.0);
            chunk_weights.extend_from_slice(&full_weights[body_range]);
            chunk_weights.push(1.0);
            if self.padding == Padding::Zero && max_len.chunks() > 1 {
                let chunk_ids = &mut ids[start..];
                let before_last = chunk_ids[CHUNK_LEN - 2];
                if before_last != self.eos && before_last != self.pad {
                    chunk_ids[CHUNK_LEN - 1] = self.eos;
                }
                if chunk_ids[1] == self.pad {
                    chunk_ids[1] = self.eos;
                }
            }
        }
        TokenChunks {
            ids,
            weights: chunk_weights,
            truncated,
        }
    }
}

/// The tokenizer to use for a model: `--tokenizer DIR` if given, else the `tokenizer/` folder of
/// a diffusers model, else a `tokenizer/` folder beside a single-file checkpoint, else the
/// built-in CLIP vocabulary (single-file checkpoints carry none, and nothing is downloaded).
pub fn tokenizer_source(model: &Path, explicit: Option<&Path>) -> TokenizerSource {
    if let Some(dir) = explicit {
        return TokenizerSource::Folder(dir.to_path_buf());
    }
    let candidate = if model.is_dir() {
        Some(model.join("tokenizer"))
    } else {
        model.parent().map(|dir| dir.join("tokenizer"))
    };
    candidate
        .filter(|dir| dir.join("vocab.json").is_file())
        .map_or(TokenizerSource::BuiltIn, TokenizerSource::Folder)
}

/// Parses the A1111 attention syntax into `(text, weight)` fragments, as sd-scripts'
/// `parse_prompt_attention`: `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w, escapes `\( \) \[ \] \\`,
/// unclosed brackets closed at the end, adjacent equal weights merged.
pub fn parse_prompt_attention(text: &str) -> Vec<(String, f64)> {
    let mut fragments: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    fn multiply(fragments: &mut [(String, f64)], from: usize, factor: f64) {
        for fragment in &mut fragments[from..] {
            fragment.1 *= factor;
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' => {
                // An escape takes the next bracket or backslash literally; a lone backslash
                // stays as it is.
                match chars.get(i + 1) {
                    Some(&next @ ('(' | ')' | '[' | ']' | '\\')) => {
                        fragments.push((next.to_string(), 1.0));
                        i += 2;
                    }
                    _ => {
                        fragments.push((String::new(), 1.0));
                        i += 1;
                    }
                }
                continue;
            }
            '(' => round.push(fragments.len()),
            '[' => square.push(fragments.len()),
            ')' if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut fragments, from, 1.1);
            }
            ']' if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut fragments, from, 1.0 / 1.1);
            }
            ':' => {
                // `:<number>)` closes a round bracket with an explicit weight.
                let number_end = chars[i + 1..]
                    .iter()
                    .position(|ch| !(ch.is_ascii_digit() || matches!(ch, '.' | '+' | '-')))
                    .map(|offset| i + 1 + offset);
                let weight = number_end
                    .filter(|&end| end > i + 1 && chars[end] == ')')
                    .and_then(|end| {
                        let number: String = chars[i + 1..end].iter().collect();
                        number.parse::<f64>().ok().map(|w| (w, end))
                    });
                match weight {
                    Some((w, end)) if !round.is_empty() => {
                        let from = round.pop().expect("checked non-empty");
                        multiply(&mut fragments, from, w);
                        i = end + 1;
                        continue;
                    }
                    _ => fragments.push((":".into(), 1.0)),
                }
            }
            _ => {
                let end = chars[i..]
                    .iter()
                    .position(|ch| matches!(ch, '\\' | '(' | ')' | '[' | ']' | ':'))
                    .map_or(chars.len(), |offset| i + offset);
                let end = end.max(i + 1);
                fragments.push((chars[i..end].iter().collect(), 1.0));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    for from in round.into_iter().rev() {
        multiply(&mut fragments, from, 1.1);
    }
    for from in square.into_iter().rev() {
        multiply(&mut fragments, from, 1.0 / 1.1);
    }
    if fragments.is_empty() {
        return vec![(String::new(), 1.0)];
    }
    let mut merged: Vec<(String, f64)> = Vec::with_capacity(fragments.len());
    for (text, weight) in fragments {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_syntax() {
        let parsed = parse_prompt_attention("a (cat:1.2) on [chair], ((best)) \\(x\\)");
        let expected: Vec<(String, f64)> = vec![
            ("a ".into(), 1.0),
            ("cat".into(), 1.2),
            (" on ".into(), 1.0),
            ("chair".into(), 1.0 / 1.1),
            (", ".into(), 1.0),
            ("best".into(), 1.1 * 1.1),
            (" (x)".into(), 1.0),
        ];
        assert_eq!(parsed, expected);
        assert_eq!(parse_prompt_attention(""), vec![(String::new(), 1.0)]);
        assert_eq!(
            parse_prompt_attention("(open"),
            vec![("open".to_string(), 1.1)]
        );
        assert_eq!(
            parse_prompt_attention("x:1.5) y"),
            vec![("x:1.5) y".to_string(), 1.0)]
        );
    }

    #[test]
    fn token_lengths() {
        assert!(MaxTokenLength::new(100).is_err());
        let len = MaxTokenLength::new(225).unwrap();
        assert_eq!((len.chunks(), len.sequence_len()), (3, 227));
        assert_eq!(MaxTokenLength::default().sequence_len(), 77);
    }
}
