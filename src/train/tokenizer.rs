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
//! (tested below). No twin: this is host code.

use crate::error::{Error, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, TokenizerBuilder};

/// The end-of-text token: joins documents in the training stream, id [`Tokenizer::eot_id`].
pub const EOT: &str = "<|endoftext|>";
/// Vocabulary size when the user gives none.
pub const DEFAULT_VOCAB_SIZE: usize = 4096;
/// Smallest vocabulary: the 256 bytes plus [`EOT`].
pub const MIN_VOCAB_SIZE: usize = 257;
/// Largest vocabulary (ids must fit the model's embedding table; 2^16 keeps them small).
pub const MAX_VOCAB_SIZE: usize = 65536;

/// A trained byte-level BPE tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eot: u32,
    vocab: usize,
    // The canonical serialization, made once, so that `to_json` cannot fail.
    json: String,
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
        let mut tk = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevelDecoder::default().into()))
        .build()
        .map_err(|e| tok_err("building the tokenizer", e))?;
        tk.train(&mut trainer, docs)
            .map_err(|e| tok_err("training", e))?;
        Self::wrap(tokenizers::Tokenizer::from(tk))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Result<Self> {
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
        let json = inner
            .to_string(false)
            .map_err(|e| tok_err("serializing", e))?;
        Ok(Tokenizer {
            inner,
            eot,
            vocab,
            json,
        })
    }

    /// Token ids of `text`. Byte-level, so any string encodes; a literal `<|endoftext|>` in
    /// the text becomes [`Tokenizer::eot_id`]. Errors only if the pre-tokenizer regex
    /// gives up (backtracking limit on pathological input).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
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
        let inner: tokenizers::Tokenizer =
            json.parse().map_err(|e| tok_err("reading tokenizer.json", e))?;
        Self::wrap(inner)
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
        Self::from_json(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn small_corpus_gives_smaller_vocab() {
        let tk = Tokenizer::train(["ab ab"].iter(), 4096).unwrap();
        assert!(tk.vocab_size() < 4096 && tk.vocab_size() >= MIN_VOCAB_SIZE);
        assert_eq!(tk.decode(&tk.encode("abc").unwrap()).unwrap(), "abc");
    }
}
