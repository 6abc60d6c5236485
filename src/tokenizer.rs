//! Byte-level BPE tokenizer for training and generation, built on the `tokenizers` crate.
//!
//! Byte-level means the base alphabet is the 256 bytes (GPT-2's byte-to-char map), so every
//! string encodes and there is no unknown token. One special token, [`EOT`], separates
//! documents. Token ids: `0` is [`EOT`], `1..=256` the bytes, then the merges in the order
//! they were learned. The GPT-2 pre-tokenizer regex splits words before merging, so a token
//! never spans a word and the following space (`" the"` is one token, `"the "` is not).
//!
//! Training is deterministic: the crate breaks ties between equally frequent pairs by token
//! id, so the same documents and vocabulary size give a byte-identical `tokenizer.json`
//! (tested below).
//!
//! Speed: the crate's byte-level pre-tokenizer runs GPT-2's pattern with fancy-regex (its
//! `\s+(?!\S)` lookahead needs a backtracking engine), under 1 MB/s here, which made
//! training and encoding the 10 MB corpus take ~30 s. [`split_words`] gives the same
//! pieces with the `regex` crate's automaton and one fix-up for the lookahead (~7.5 s);
//! training feeds the BPE trainer those pieces and encoding runs the BPE model on them.
//! The `tokenizer.json` still names the standard byte-level pre-tokenizer, so other
//! tools read it unchanged, and tests check both paths give identical pieces, ids and
//! files. No twin: this is host code.

use crate::error::{Error, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, ModelWrapper, PreTokenizerWrapper, TokenizerBuilder, Trainer,
};

/// The end-of-text token: joins documents in the training stream, id [`Tokenizer::eot_id`].
pub const EOT: &str = "<|endoftext|>";
/// Vocabulary size when the user gives none.
pub const DEFAULT_VOCAB_SIZE: usize = 4096;
/// Smallest vocabulary: the 256 bytes plus [`EOT`].
pub const MIN_VOCAB_SIZE: usize = 257;
/// Largest vocabulary (ids must fit the model's embedding table; 2^16 keeps them small).
pub const MAX_VOCAB_SIZE: usize = 65536;
/// Largest vocabulary of a published model's tokenizer (Qwen's 151k, Llama 3's 128k fit).
pub const MAX_PRETRAINED_VOCAB: usize = 1 << 20;

/// GPT-2's pre-tokenizer pattern without the `\s+(?!\S)` branch; [`split_words`] restores
/// what that branch does.
const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// The pieces GPT-2's pattern
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` cuts `text`
/// into, appended to `out`. `re` is [`WORD_PATTERN`]. Every char is `\s`, a letter, a number
/// or "other", so the matches tile the text. The lookahead branch differs from plain `\s+`
/// only on a whitespace run of 2+ chars followed by a non-space: GPT-2 leaves the run's
/// last char to start the next piece (" word", or a lone "\n"), and so do we.
fn split_words<'a>(re: &regex::Regex, text: &'a str, out: &mut Vec<&'a str>) {
    let mut pos = 0;
    while pos < text.len() {
        let Some(m) = re.find_at(text, pos) else {
            out.push(&text[pos..]);
            return;
        };
        if m.start() > pos {
            // Unreachable (the branches cover every char); keep the text anyway.
            out.push(&text[pos..m.start()]);
        }
        let mut end = m.end();
        let piece = m.as_str();
        if end < text.len() && piece.chars().all(char::is_whitespace) {
            if let Some((last, _)) = piece.char_indices().last() {
                if last > 0 {
                    end = m.start() + last;
                }
            }
        }
        out.push(&text[m.start()..end]);
        pos = end;
    }
}

/// GPT-2's byte-to-char table (tokenizers' `bytes_char`): printable bytes map to themselves,
/// the others to U+0100.. in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut n = 0u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Pre-tokenizer state for the fast path.
#[derive(Clone)]
struct Words {
    re: regex::Regex,
    table: [char; 256],
}

impl Words {
    fn new() -> Result<Self> {
        let re = regex::Regex::new(WORD_PATTERN).map_err(|e| tok_err("pre-tokenizer regex", e))?;
        Ok(Words {
            re,
            table: byte_chars(),
        })
    }

    /// Byte-level symbols of `piece`, as the crate's ByteLevel pre-tokenizer writes them.
    fn symbols(&self, piece: &str) -> String {
        piece.bytes().map(|b| self.table[b as usize]).collect()
    }

    fn pieces(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_words(&self.re, text, &mut out);
        out.into_iter().map(|p| self.symbols(p)).collect()
    }
}

/// A trained byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot: u32,
    vocab: usize,
    // The canonical serialization, made once, so that `to_json` cannot fail.
    json: String,
    // Set when the tokenizer is ours (no normalizer, standard byte-level pre-tokenizer,
    // BPE, EOT the only added token): then encode may bypass the slow regex.
    fast: Option<Words>,
    // A published model's tokenizer: encode adds what its post-processor
    // adds around a text (a BOS token, for Llama 3), as the reference
    // library's `tokenizer(text)` does.
    special: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab)
            .field("eot_id", &self.eot)
            .finish()
    }
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// Every token has its own id: two tokens sharing one (a hand-edited or
/// corrupt file) would make one of them encode as the other.
/// A `tokenizer.json` text read by the `tokenizers` crate. Its syntax is
/// checked first: the crate's decoder field panics (`expect("Helper")`) on
/// JSON cut short inside it, which the fuzz test found.
fn parse_tokenizer_json(json: &str) -> Result<tokenizers::Tokenizer> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| tok_err("reading tokenizer.json", format!("not valid JSON: {e}")))?;
    check_bpe_merges(&v)?;
    // Natively, any other panic of the crate on a malformed file is an
    // error too (in the browser a panic aborts: the checks above are what
    // the fuzz test found).
    #[cfg(not(target_arch = "wasm32"))]
    let parsed =
        std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()).map_err(|_| {
            tok_err(
                "reading tokenizer.json",
                "the tokenizers crate failed on it",
            )
        })?;
    #[cfg(target_arch = "wasm32")]
    let parsed = json.parse::<tokenizers::Tokenizer>();
    parsed.map_err(|e| tok_err("reading tokenizer.json", e))
}

/// A BPE model's merges each end in at least its
/// `continuing_subword_prefix` (the crate slices past it: a shorter second
/// part panics).
fn check_bpe_merges(v: &serde_json::Value) -> Result<()> {
    let model = &v["model"];
    let Some(prefix) = model["continuing_subword_prefix"].as_str() else {
        return Ok(());
    };
    let Some(merges) = model["merges"].as_array() else {
        return Ok(());
    };
    for m in merges {
        let second = match m {
            serde_json::Value::String(s) => s.split_once(' ').map(|(_, b)| b),
            serde_json::Value::Array(p) => p.get(1).and_then(|b| b.as_str()),
            _ => None,
        };
        if let Some(b) = second {
            if b.len() < prefix.len() || !b.is_char_boundary(prefix.len()) {
                return Err(tok_err(
                    "reading tokenizer.json",
                    format!("merge {m} is shorter than the continuing_subword_prefix {prefix:?}"),
                ));
            }
        }
    }
    Ok(())
}

fn check_ids(inner: &tokenizers::Tokenizer) -> Result<()> {
    let vocab = inner.get_vocab(true);
    let mut by_id: std::collections::HashMap<u32, &str> = std::collections::HashMap::new();
    let mut clash: Option<(u32, String, String)> = None;
    for (tok, &id) in &vocab {
        if let Some(other) = by_id.insert(id, tok) {
            // The smallest id for a stable message.
            let (a, b) = if other < tok.as_str() {
                (other, tok.as_str())
            } else {
                (tok.as_str(), other)
            };
            if clash.as_ref().is_none_or(|c| id < c.0) {
                clash = Some((id, a.to_string(), b.to_string()));
            }
        }
    }
    match clash {
        Some((id, a, b)) => Err(Error::Tokenizer(format!(
            "tokens {a:?} and {b:?} share id {id} (every token needs its own id)"
        ))),
        None => Ok(()),
    }
}

impl Tokenizer {
    /// Learns a BPE vocabulary of `vocab_size` tokens (bytes and [`EOT`] included) from
    /// `docs`. A corpus too small to yield that many merges gives a smaller vocabulary:
    /// size the model with [`Tokenizer::vocab_size`], not with the request.
    pub fn train<I, S>(docs: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
            return Err(Error::invalid(
                "tokenizer",
                format!(
                    "vocabulary size {vocab_size} outside {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE} \
                     (256 bytes + the end-of-text token at least)"
                ),
            ));
        }
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .special_tokens(vec![AddedToken::from(EOT.to_string(), true)])
            // All 256 bytes, even those the corpus lacks: a byte-level tokenizer must encode
            // any input.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let words = Words::new()?;
        trainer
            .feed(docs, |doc| Ok(words.pieces(doc)))
            .map_err(|e| tok_err("training", e))?;
        let mut model = BPE::default();
        let special = trainer
            .train(&mut model)
            .map_err(|e| tok_err("training", e))?;
        let mut tk = Self::pipeline(model)?;
        tk.add_special_tokens(&special);
        Self::wrap(tokenizers::Tokenizer::from(tk), None)
    }

    /// Our pipeline around a BPE model: no normalizer, byte-level pre-tokenizer and decoder.
    fn pipeline(
        model: BPE,
    ) -> Result<
        tokenizers::TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >,
    > {
        TokenizerBuilder::new()
            .with_model(model)
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevelDecoder::default().into()))
            .build()
            .map_err(|e| tok_err("building the tokenizer", e))
    }

    /// `json`: the file's text when read from one (kept as it is: the
    /// `tokenizers` crate prints warnings to stdout while it serializes
    /// some vocabularies), else None (serialized here).
    fn wrap(inner: tokenizers::Tokenizer, json: Option<&str>) -> Result<Self> {
        check_ids(&inner)?;
        let eot = inner
            .token_to_id(EOT)
            .ok_or_else(|| Error::Tokenizer(format!("no {EOT} token in the vocabulary")))?;
        let vocab = inner.get_vocab_size(true);
        if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab) {
            return Err(Error::Tokenizer(format!(
                "vocabulary size {vocab} outside {MIN_VOCAB_SIZE}..={MAX_VOCAB_SIZE}"
            )));
        }
        // Byte-level: every single byte must have a token, or some input would not encode.
        for ch in ByteLevel::alphabet() {
            if inner.token_to_id(&ch.to_string()).is_none() {
                return Err(Error::Tokenizer(format!(
                    "not a byte-level tokenizer: byte symbol {ch:?} has no token"
                )));
            }
        }
        let json = match json {
            Some(j) => j.to_string(),
            None => inner
                .to_string(false)
                .map_err(|e| tok_err("serializing", e))?,
        };
        let ours = inner.get_normalizer().is_none()
            && matches!(inner.get_model(), ModelWrapper::BPE(_))
            && matches!(inner.get_pre_tokenizer(),
                Some(PreTokenizerWrapper::ByteLevel(b)) if !b.add_prefix_space && b.use_regex)
            && inner.get_added_tokens_decoder().len() == 1;
        let fast = if ours { Some(Words::new()?) } else { None };
        Ok(Tokenizer {
            inner,
            eot,
            vocab,
            json,
            fast,
            special: false,
        })
    }

    /// Token ids of `text`. Byte-level, so any string encodes; a literal `<|endoftext|>` in
    /// the text becomes [`Tokenizer::eot_id`]. Errors only if the pre-tokenizer regex
    /// gives up (backtracking limit on pathological input).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let Some(words) = &self.fast else {
            return self.encode_slow(text);
        };
        let model = self.inner.get_model();
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut pieces = Vec::new();
        for (i, part) in text.split(EOT).enumerate() {
            if i > 0 {
                ids.push(self.eot);
            }
            pieces.clear();
            split_words(&words.re, part, &mut pieces);
            for piece in &pieces {
                let tokens = model
                    .tokenize(&words.symbols(piece))
                    .map_err(|e| tok_err("encoding", e))?;
                ids.extend(tokens.iter().map(|t| t.id));
            }
        }
        Ok(ids)
    }

    /// The crate's own encoding path (fancy-regex pre-tokenizer): for tokenizers that are not
    /// ours, and to check the fast path against.
    fn encode_slow(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, self.special)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` ([`EOT`] is written out). A partial UTF-8 sequence (a token cut
    /// mid-character) decodes to U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(Error::Tokenizer(format!(
                "id {bad} outside the vocabulary of {} tokens",
                self.vocab
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err("decoding", e))
    }

    /// Number of tokens, bytes and [`EOT`] included: the model's `V`.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Id of [`EOT`].
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// The string of one token (byte-level symbols, e.g. `Ġthe` for `" the"`), for traces.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The `tokenizer.json` text (Hugging Face format, compact).
    pub fn to_json(&self) -> String {
        self.json.clone()
    }

    /// Reads a `tokenizer.json` text written by [`Tokenizer::to_json`] (or any byte-level
    /// BPE with an [`EOT`] token).
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = parse_tokenizer_json(json)?;
        Self::wrap(inner, Some(json))
    }

    /// Reads a published model's `tokenizer.json`: any model the `tokenizers` crate
    /// reads (byte-level BPE, SentencePiece-style BPE with byte fallback, ...), up to
    /// [`MAX_PRETRAINED_VOCAB`] tokens. The end of a text is `eos` (the model's
    /// `eos_token_id`), else its [`EOT`] token.
    pub fn from_pretrained_json(json: &str, eos: Option<u32>) -> Result<Self> {
        let inner = parse_tokenizer_json(json)?;
        check_ids(&inner)?;
        let vocab = inner.get_vocab_size(true);
        if !(1..=MAX_PRETRAINED_VOCAB).contains(&vocab) {
            return Err(Error::Tokenizer(format!(
                "vocabulary size {vocab} outside 1..={MAX_PRETRAINED_VOCAB}"
            )));
        }
        let eot = match (eos, inner.token_to_id(EOT)) {
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) => {
                return Err(Error::Tokenizer(format!(
                    "no end-of-sequence id (eos_token_id) and no {EOT} token"
                )))
            }
        };
        Ok(Tokenizer {
            inner,
            eot,
            vocab,
            json: json.to_string(),
            fast: None,
            special: true,
        })
    }

    /// Writes `tokenizer.json` to `path`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, &self.json).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a `tokenizer.json` file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&json).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (fuzz): files the `tokenizers` crate panicked on are
    /// errors: JSON cut inside the decoder, a BPE merge shorter than the
    /// continuing-subword prefix.
    #[test]
    fn files_the_crate_panicked_on_are_errors() {
        let json = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hf/qwen2_moe/tokenizer.json"
        ))
        .unwrap();
        let at = json.find("\"decoder\"").unwrap();
        let cut = &json[..at + 30];
        let m = Tokenizer::from_pretrained_json(cut, Some(0))
            .unwrap_err()
            .to_string();
        assert!(m.contains("not valid JSON"), "{m}");
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["model"]["continuing_subword_prefix"] = "xx".into();
        let m = Tokenizer::from_pretrained_json(&v.to_string(), Some(0))
            .unwrap_err()
            .to_string();
        assert!(m.contains("continuing_subword_prefix"), "{m}");
    }

    const DOCS: [&str; 3] = [
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
        "In the beginning God created the heaven and the earth.\nAnd the earth was without form",
        "the the the then there these those; to be the one\n\nto be",
    ];

    fn small() -> Tokenizer {
        Tokenizer::train(DOCS.iter(), 300).unwrap()
    }

    #[test]
    fn roundtrip_any_text() {
        let tk = small();
        assert_eq!(tk.vocab_size(), 300);
        assert_eq!(tk.eot_id(), 0);
        for text in [
            "To be, or not to be",
            "",
            "unseen ZQX 123 \t tabs\r\n",
            "naïve café — 東京 🙂 \u{0}",
            "two  spaces   and trailing ",
        ] {
            let ids = tk.encode(text).unwrap();
            assert!(ids.iter().all(|&id| (id as usize) < tk.vocab_size()));
            assert_eq!(tk.decode(&ids).unwrap(), text, "{text:?}");
        }
        // Merges were learned: a frequent word is one token.
        assert_eq!(tk.encode(" the").unwrap().len(), 1);
    }

    #[test]
    fn eot_token() {
        let tk = small();
        let ids = tk.encode("be<|endoftext|>the").unwrap();
        assert!(ids.contains(&tk.eot_id()));
        assert_eq!(tk.decode(&ids).unwrap(), "be<|endoftext|>the");
        assert_eq!(tk.decode(&[tk.eot_id()]).unwrap(), EOT);
    }

    #[test]
    fn json_roundtrip_and_determinism() {
        let a = small();
        let b = small();
        assert_eq!(a.to_json(), b.to_json());
        let c = Tokenizer::from_json(&a.to_json()).unwrap();
        assert_eq!(c.to_json(), a.to_json());
        assert_eq!(c.vocab_size(), a.vocab_size());
        let text = "Whether 'tis nobler, the earth";
        assert_eq!(c.encode(text).unwrap(), a.encode(text).unwrap());
    }

    /// Two tokens with one id: refused by name, by both readers.
    #[test]
    fn a_shared_id_is_an_error() {
        let tk = small();
        let mut v: serde_json::Value = serde_json::from_str(&tk.to_json()).unwrap();
        let id = v["model"]["vocab"]["a"].clone();
        v["model"]["vocab"]["b"] = id.clone();
        let text = v.to_string();
        for e in [
            Tokenizer::from_json(&text).err(),
            Tokenizer::from_pretrained_json(&text, None).err(),
        ] {
            let e = e.expect("a shared id").to_string();
            assert!(e.contains("share id") && e.contains(&id.to_string()), "{e}");
        }
    }

    #[test]
    fn save_load() {
        let dir = std::env::temp_dir().join(format!("amoe_tok_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let tk = small();
        tk.save(&path).unwrap();
        assert_eq!(Tokenizer::load(&path).unwrap().to_json(), tk.to_json());
        std::fs::write(&path, "{not json").unwrap();
        let err = Tokenizer::load(&path).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(ref m) if m.contains("tokenizer.json")));
        let err = Tokenizer::load(dir.join("missing.json")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_arguments() {
        assert!(matches!(
            Tokenizer::train(DOCS.iter(), 256),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            Tokenizer::train(DOCS.iter(), 65537),
            Err(Error::InvalidArgument { .. })
        ));
        let tk = small();
        assert!(matches!(tk.decode(&[300]), Err(Error::Tokenizer(_))));
        assert!(matches!(
            Tokenizer::from_json("{}"),
            Err(Error::Tokenizer(_))
        ));
    }

    /// Strings that stress the pre-tokenizer: whitespace runs of every kind before words,
    /// numbers and punctuation, contractions, Unicode spaces, letters that are not `\p{L}`
    /// (combining marks, letter-like numbers), emoji, the end-of-text token.
    const TRICKY: [&str; 12] = [
        "  word\n\nword \n word\t\tx  \n  ",
        "it's they're I'M we'll you'd 'tis  's ''s",
        "1,234.5  42abc  x2 ⅫⅣ 3½",
        "\u{a0}\u{a0}nbsp\u{2003}em\u{3000}ideo \u{85}nel\u{2028}ls",
        "e\u{301}te\u{301} \u{345}x \u{94d}\u{93f}क्षि",
        "🙂🙂 hi🙂 ! ?? ...  ---  \"q\"",
        "trailing   ",
        "   ",
        "",
        "\r\n\r\nCRLF\r\n",
        "a<|endoftext|>b <|endoftext|> <|endoftext|><|endoftext|>",
        "\u{0}\u{1}\u{7f} ctrl\u{1b}[0m",
    ];

    fn fuzz_strings(n: usize) -> Vec<String> {
        let alphabet: Vec<char> = "aZ 0\n\t'sdmlvrt.,!-\u{a0}\u{301}Ⅻ½é🙂<|endoftext>"
            .chars()
            .collect();
        let mut x = 12345u64;
        (0..n)
            .map(|_| {
                (0..40)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        alphabet[(x >> 33) as usize % alphabet.len()]
                    })
                    .collect()
            })
            .collect()
    }

    fn slow_pieces(text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut p = PreTokenizedString::from(text);
        ByteLevel::new(false, true, true)
            .pre_tokenize(&mut p)
            .unwrap();
        p.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    /// The crate's own training path, to check the fast one against.
    fn train_slow(docs: &[&str], vocab_size: usize) -> String {
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .special_tokens(vec![AddedToken::from(EOT.to_string(), true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tk = Tokenizer::pipeline(BPE::default()).unwrap();
        tk.train(&mut trainer, docs.iter()).unwrap();
        tokenizers::Tokenizer::from(tk).to_string(false).unwrap()
    }

    fn corpus_slice() -> Vec<String> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            use crate::train::data::{shipped_dir, Corpus, Domain};
            let c = Corpus::shipped(shipped_dir(), Domain::Both).unwrap();
            // A few documents of each file, cut short: fast enough for a debug test.
            c.docs
                .iter()
                .step_by(9)
                .map(|d| d.text.chars().take(40_000).collect())
                .collect()
        }
        #[cfg(target_arch = "wasm32")]
        Vec::new()
    }

    #[test]
    fn fast_pieces_match_gpt2_pattern() {
        let words = Words::new().unwrap();
        let mut all: Vec<String> = TRICKY.iter().map(|s| s.to_string()).collect();
        all.extend(fuzz_strings(300));
        all.extend(corpus_slice());
        for text in &all {
            assert_eq!(words.pieces(text), slow_pieces(text), "{text:?}");
        }
        let table: std::collections::HashSet<char> = byte_chars().into_iter().collect();
        assert_eq!(table, ByteLevel::alphabet().into_iter().collect());
    }

    #[test]
    fn fast_paths_match_crate() {
        let slice = corpus_slice();
        let mut docs: Vec<&str> = slice.iter().map(String::as_str).collect();
        docs.extend(TRICKY);
        let tk = Tokenizer::train(docs.iter(), 1000).unwrap();
        assert!(tk.fast.is_some());
        assert_eq!(tk.to_json(), train_slow(&docs, 1000));
        let fuzz = fuzz_strings(200);
        for text in docs.iter().copied().chain(fuzz.iter().map(String::as_str)) {
            assert_eq!(
                tk.encode(text).unwrap(),
                tk.encode_slow(text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn small_corpus_gives_smaller_vocab() {
        let tk = Tokenizer::train(["ab ab"].iter(), 4096).unwrap();
        assert!(tk.vocab_size() < 4096 && tk.vocab_size() >= MIN_VOCAB_SIZE);
        assert_eq!(tk.decode(&tk.encode("abc").unwrap()).unwrap(), "abc");
    }

    /// A published model's tokenizer adds what its post-processor adds (a
    /// BOS token here), as the reference library's `tokenizer(text)` does;
    /// amoe's own never adds anything.
    #[test]
    fn pretrained_tokenizers_add_their_special_tokens() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf/llama/tokenizer.json");
        let text = std::fs::read_to_string(path).unwrap();
        let plain = Tokenizer::from_pretrained_json(&text, Some(0)).unwrap();
        let ids = plain.encode("Shall I compare").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
        });
        let bos = Tokenizer::from_pretrained_json(&v.to_string(), Some(0)).unwrap();
        let with = bos.encode("Shall I compare").unwrap();
        assert_eq!(with[0], 0);
        assert_eq!(&with[1..], &ids[..]);
        // amoe's own reading of the same file adds nothing.
        let ours = Tokenizer::from_json(&v.to_string()).unwrap();
        assert_eq!(ours.encode("Shall I compare").unwrap(), ids);
    }
}
