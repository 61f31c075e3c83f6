//! The embedded default corpus: text in a made-up language whose entropy is known
//! exactly, so that a run can print the best achievable perplexity beside the model's.
//!
//! The language is a first-order Markov chain over a few hundred made-up words plus an
//! end-of-document event, all a pure function of a seed. Rendering adds no entropy:
//! words are joined by single spaces, a sentence-final word takes a period, and the
//! word after it starts a new line with a capital letter. Text and word sequence thus
//! determine each other, and every document carries its exact negative log-likelihood
//! under the source. Summed over a split and divided by the split's predicted tokens,
//! that is the best mean cross-entropy any model can reach on it.
//!
//! The text is made with integer arithmetic only (probabilities are ratios of integer
//! weights; the generator is the project's fixed SplitMix64, crate::rng), so it never changes with
//! the platform or a crate version: cached token files depend on that. Floating point
//! enters only the reported likelihoods.

use crate::rng::SplitMix64;
use std::collections::{HashMap, HashSet};

/// The quickstart's language.
pub const DEFAULT_SEED: u64 = 0x5EED_A16E;
/// About 4 MiB of training text (some 620,000 words).
pub const DEFAULT_TRAIN_BYTES: usize = 4 << 20;
/// Valid and test each: about 39,000 word events, which pin the mean NLL to within
/// about 0.004 nats (one standard error).
pub const DEFAULT_EVAL_BYTES: usize = 256 << 10;

/// A few hundred words: enough for a bigram table that is worth learning, few enough
/// for a small model to learn in a few hundred steps.
const VOCABULARY_SIZE: usize = 320;
/// Each word has between this many distinct successors...
const MIN_SUCCESSORS: usize = 4;
/// ...and this many (uniformly drawn per word).
const MAX_SUCCESSORS: usize = 40;
/// Distinct words a document may start with.
const FIRST_WORDS: usize = 40;
/// One word in this many ends a sentence; only those may end a document, so that
/// every document ends with a period.
const SENTENCE_FINAL_ONE_IN: usize = 8;
/// After a sentence-final word the document ends with probability 1 / this.
const DOCUMENT_END_ONE_IN: u64 = 12;

/// Successors get Zipf–Mandelbrot weights `ZIPF_SCALE / (rank + offset)`, integers
/// so that sampling is exact. A small offset (1) gives a steep distribution, a larger
/// one a flatter one; each word draws its own from `1..=MAX_ZIPF_OFFSET`.
const ZIPF_SCALE: u64 = 1 << 20;
const MAX_ZIPF_OFFSET: usize = 4;
/// Successors are drawn from a Zipf popularity over words (the weight of word `i` is
/// `ZIPF_SCALE / (i + POPULARITY_OFFSET)`), so that, as in real text, a few words are
/// common and many are rare.
const POPULARITY_OFFSET: usize = 8;

const ONSETS: [&str; 20] = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th", "kr", "pl", "st"];
const VOWELS: [&str; 7] = ["a", "e", "i", "o", "u", "ai", "ou"];
const CODAS: [&str; 5] = ["n", "r", "s", "l", "k"];

/// The state between documents: as a successor it is the END event, as a state its
/// row is the distribution of first words.
const BOUNDARY: usize = VOCABULARY_SIZE;

/// Power iteration stops when one step moves the distribution less than this (L1).
const STATIONARY_TOLERANCE: f64 = 1e-14;
const STATIONARY_MAX_STEPS: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

/// One generated document and its exact likelihood under the source.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub text: String,
    /// -log p(first word) - Σ log p(next | previous) - log p(END | last word).
    pub nll_nats: f64,
    pub words: usize,
}

impl Document {
    /// Word events the NLL covers: each word, and the end of the document.
    pub fn events(&self) -> usize {
        self.words + 1
    }
}

/// Generator streams: the language and each split draw from their own.
const LANGUAGE_STREAM: usize = 0;

fn split_stream(split: Split) -> usize {
    match split {
        Split::Train => 1,
        Split::Valid => 2,
        Split::Test => 3,
    }
}

/// Stream `n` is seeded by output `n` (from 0) of SplitMix64(seed): the streams start
/// at unrelated points of the generator's 2^64 cycle, and runs of a few million draws
/// do not overlap in practice.
fn stream_seed(seed: u64, stream: usize) -> u64 {
    let mut root = SplitMix64::new(seed);
    std::iter::repeat_with(|| root.next_u64()).nth(stream).expect("an endless iterator")
}

/// The distribution of what follows one state, as integer weights.
#[derive(Clone, Debug)]
struct Transitions {
    next: Vec<usize>,
    /// Running sums of the weights: a draw below `total` lands in exactly one entry.
    cumulative: Vec<u64>,
    probability: Vec<f64>,
    /// -ln probability, computed once so that generation and parsing add the very same
    /// numbers in the same order.
    cost: Vec<f64>,
}

impl Transitions {
    fn from_weights(weighted: &[(usize, u64)]) -> Self {
        assert!(weighted.iter().all(|&(_, w)| w > 0), "every successor must be possible");
        let mut cumulative = Vec::with_capacity(weighted.len());
        let mut total = 0u64;
        for &(_, weight) in weighted {
            total += weight;
            cumulative.push(total);
        }
        let probability: Vec<f64> = weighted.iter().map(|&(_, w)| w as f64 / total as f64).collect();
        Transitions {
            next: weighted.iter().map(|&(n, _)| n).collect(),
            cumulative,
            cost: probability.iter().map(|p| -p.ln()).collect(),
            probability,
        }
    }

    fn total(&self) -> u64 {
        *self.cumulative.last().expect("a state has successors")
    }

    /// The next state and its cost in nats.
    fn sample(&self, rng: &mut SplitMix64) -> (usize, f64) {
        let draw = rng.below(self.total());
        let i = self.cumulative.partition_point(|&c| c <= draw);
        (self.next[i], self.cost[i])
    }

    fn cost_of(&self, next: usize) -> Option<f64> {
        self.next.iter().position(|&n| n == next).map(|i| self.cost[i])
    }

    fn entropy(&self) -> f64 {
        self.probability.iter().zip(&self.cost).map(|(p, c)| p * c).sum()
    }
}

/// A made-up language: vocabulary, which words end sentences, and a Markov chain over
/// words and the document boundary.
pub struct SyntheticLanguage {
    /// Kept to seed the split streams.
    seed: u64,
    vocabulary: Vec<String>,
    word_index: HashMap<String, usize>,
    sentence_final: Vec<bool>,
    /// One row per word, then the boundary's row (the first-word distribution).
    transitions: Vec<Transitions>,
    /// Long-run share of each state among word events (words, then END).
    stationary: Vec<f64>,
    entropy_rate: f64,
}

impl SyntheticLanguage {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(stream_seed(seed, LANGUAGE_STREAM));
        let vocabulary = make_vocabulary(&mut rng);
        let sentence_final = choose_sentence_final(&mut rng);
        let transitions = make_transitions(&mut rng, &sentence_final);
        let stationary = stationary_distribution(&transitions);
        let entropy_rate = stationary.iter().zip(&transitions).map(|(pi, row)| pi * row.entropy()).sum();
        let word_index = vocabulary.iter().enumerate().map(|(i, w)| (w.clone(), i)).collect();
        SyntheticLanguage { seed, vocabulary, word_index, sentence_final, transitions, stationary, entropy_rate }
    }

    pub fn vocabulary(&self) -> &[String] {
        &self.vocabulary
    }

    /// Nats per word event (words and END events): Σ_s π(s) H(next | s), where π is
    /// the stationary distribution of the chain whose END state moves to a first word.
    /// Documents are the chain's cycles through END, so this is the limit of a split's
    /// total NLL divided by its total word events.
    pub fn entropy_rate(&self) -> f64 {
        self.entropy_rate
    }

    /// Expected words per document: END recurs every 1/π(END) events, one of which is
    /// the END itself.
    pub fn mean_words_per_document(&self) -> f64 {
        1.0 / self.stationary[BOUNDARY] - 1.0
    }

    /// Deterministic documents of one split until about `target_bytes` of text: they
    /// stop as soon as their texts (separators not counted) reach the target, so the
    /// total exceeds it by less than one document.
    pub fn documents(&self, split: Split, target_bytes: usize) -> impl Iterator<Item = Document> + '_ {
        let mut rng = SplitMix64::new(stream_seed(self.seed, split_stream(split)));
        let mut bytes = 0usize;
        std::iter::from_fn(move || {
            if bytes >= target_bytes {
                return None;
            }
            let document = self.sample_document(&mut rng);
            bytes += document.text.len();
            Some(document)
        })
    }

    /// Exact NLL (nats) of a document text under the source, parsing it back to words;
    /// None for text the source cannot produce.
    pub fn nll_of_text(&self, text: &str) -> Option<f64> {
        let words = self.parse(text)?;
        let mut state = BOUNDARY;
        let mut nll = 0.0;
        for &word in &words {
            nll += self.transitions[state].cost_of(word)?;
            state = word;
        }
        Some(nll + self.transitions[state].cost_of(BOUNDARY)?)
    }

    fn sample_document(&self, rng: &mut SplitMix64) -> Document {
        let mut text = String::new();
        let mut nll_nats = 0.0;
        let mut words = 0;
        let mut previous = None;
        loop {
            let (next, cost) = self.transitions[previous.unwrap_or(BOUNDARY)].sample(rng);
            nll_nats += cost;
            if next == BOUNDARY {
                return Document { text, nll_nats, words };
            }
            self.push_word(&mut text, previous, next);
            words += 1;
            previous = Some(next);
        }
    }

    /// Appends `word` as it is written after `previous` (None: first in the document).
    fn push_word(&self, text: &mut String, previous: Option<usize>, word: usize) {
        let starts_sentence = match previous {
            None => true,
            Some(p) if self.sentence_final[p] => {
                text.push('\n');
                true
            }
            Some(_) => {
                text.push(' ');
                false
            }
        };
        let spelling = &self.vocabulary[word];
        if starts_sentence {
            // Words are lowercase ASCII, so the first byte is a whole character.
            text.push(char::from(spelling.as_bytes()[0].to_ascii_uppercase()));
            text.push_str(&spelling[1..]);
        } else {
            text.push_str(spelling);
        }
        if self.sentence_final[word] {
            text.push('.');
        }
    }

    fn render(&self, words: &[usize]) -> String {
        let mut text = String::new();
        let mut previous = None;
        for &word in words {
            self.push_word(&mut text, previous, word);
            previous = Some(word);
        }
        text
    }

    /// The word sequence a text renders, or None if no sequence renders exactly it.
    fn parse(&self, text: &str) -> Option<Vec<usize>> {
        let mut words = Vec::new();
        for token in text.split([' ', '\n']) {
            let bare = token.strip_suffix('.').unwrap_or(token);
            words.push(*self.word_index.get(&bare.to_ascii_lowercase())?);
        }
        // Case, periods and spacing are functions of the word sequence; rendering it
        // again rejects any text whose decorations disagree with its words.
        (self.render(&words) == text).then_some(words)
    }
}

/// Distinct words of one to three syllables (onset, vowel, sometimes a coda).
fn make_vocabulary(rng: &mut SplitMix64) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut vocabulary = Vec::with_capacity(VOCABULARY_SIZE);
    while vocabulary.len() < VOCABULARY_SIZE {
        // Mostly two syllables; one word in four has one, one in four has three.
        let syllables = [1, 2, 2, 3][rng.index_below(4)];
        let mut word = String::new();
        for _ in 0..syllables {
            word.push_str(ONSETS[rng.index_below(ONSETS.len())]);
            word.push_str(VOWELS[rng.index_below(VOWELS.len())]);
            if rng.below(4) == 0 {
                word.push_str(CODAS[rng.index_below(CODAS.len())]);
            }
        }
        if seen.insert(word.clone()) {
            vocabulary.push(word);
        }
    }
    vocabulary
}

/// Exactly one word in SENTENCE_FINAL_ONE_IN, chosen at random.
fn choose_sentence_final(rng: &mut SplitMix64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..VOCABULARY_SIZE).collect();
    rng.shuffle(&mut order);
    let mut sentence_final = vec![false; VOCABULARY_SIZE];
    for &word in &order[..VOCABULARY_SIZE / SENTENCE_FINAL_ONE_IN] {
        sentence_final[word] = true;
    }
    sentence_final
}

/// One row per word, then the boundary's row.
fn make_transitions(rng: &mut SplitMix64, sentence_final: &[bool]) -> Vec<Transitions> {
    let by_popularity: Vec<(usize, u64)> = (0..VOCABULARY_SIZE).map(|word| (word, zipf_weight(word, POPULARITY_OFFSET))).collect();
    let popularity = Transitions::from_weights(&by_popularity);

    // Each word's successors include its next word on one random cycle through the
    // whole vocabulary. Every word then reaches every other, sentence-final ones
    // included: every document ends, and the chain has a single stationary distribution.
    let mut cycle: Vec<usize> = (0..VOCABULARY_SIZE).collect();
    rng.shuffle(&mut cycle);
    let mut next_on_cycle = vec![0; VOCABULARY_SIZE];
    for (i, &word) in cycle.iter().enumerate() {
        next_on_cycle[word] = cycle[(i + 1) % VOCABULARY_SIZE];
    }

    let mut rows = Vec::with_capacity(VOCABULARY_SIZE + 1);
    for word in 0..VOCABULARY_SIZE {
        let count = MIN_SUCCESSORS + rng.index_below(MAX_SUCCESSORS - MIN_SUCCESSORS + 1);
        let mut successors = vec![next_on_cycle[word]];
        draw_distinct(rng, &popularity, &mut successors, count, Some(word));
        // The cycle's successor takes a random rank rather than always the likeliest.
        let rank = rng.index_below(count);
        successors.swap(0, rank);
        let mut weighted = zipf_weighted(rng, &successors);
        if sentence_final[word] {
            let total: u64 = weighted.iter().map(|&(_, weight)| weight).sum();
            weighted.push((BOUNDARY, total / (DOCUMENT_END_ONE_IN - 1)));
        }
        rows.push(Transitions::from_weights(&weighted));
    }
    let mut first_words = Vec::with_capacity(FIRST_WORDS);
    draw_distinct(rng, &popularity, &mut first_words, FIRST_WORDS, None);
    rows.push(Transitions::from_weights(&zipf_weighted(rng, &first_words)));
    rows
}

/// Adds words drawn by popularity to `words` until it holds `count` distinct ones.
fn draw_distinct(rng: &mut SplitMix64, popularity: &Transitions, words: &mut Vec<usize>, count: usize, excluded: Option<usize>) {
    while words.len() < count {
        let (word, _) = popularity.sample(rng);
        if Some(word) != excluded && !words.contains(&word) {
            words.push(word);
        }
    }
}

/// Zipf–Mandelbrot weights in list order, with an offset drawn for the list.
fn zipf_weighted(rng: &mut SplitMix64, words: &[usize]) -> Vec<(usize, u64)> {
    let offset = 1 + rng.index_below(MAX_ZIPF_OFFSET);
    words.iter().enumerate().map(|(rank, &word)| (word, zipf_weight(rank, offset))).collect()
}

fn zipf_weight(rank: usize, offset: usize) -> u64 {
    ZIPF_SCALE / (rank + offset) as u64
}

/// The π with π = πP, by power iteration from the uniform distribution. Each step
/// goes half way, π ← (π + πP) / 2: the same fixed point, but convergence no longer
/// needs the chain to be aperiodic, only irreducible (which the cycle guarantees).
/// The chain forgets its start within a few words: the default language converges in
/// 71 steps.
fn stationary_distribution(transitions: &[Transitions]) -> Vec<f64> {
    let states = transitions.len();
    let mut pi = vec![1.0 / states as f64; states];
    for _ in 0..STATIONARY_MAX_STEPS {
        let mut stepped = vec![0.0; states];
        for (from, row) in transitions.iter().enumerate() {
            for (&to, &p) in row.next.iter().zip(&row.probability) {
                stepped[to] += pi[from] * p;
            }
        }
        let mut change = 0.0;
        for (old, new) in pi.iter_mut().zip(stepped) {
            let half_way = 0.5 * (*old + new);
            change += (half_way - *old).abs();
            *old = half_way;
        }
        if change < STATIONARY_TOLERANCE {
            let total: f64 = pi.iter().sum();
            return pi.into_iter().map(|p| p / total).collect();
        }
    }
    panic!("the stationary distribution did not converge in {STATIONARY_MAX_STEPS} steps");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_language() -> SyntheticLanguage {
        SyntheticLanguage::new(DEFAULT_SEED)
    }

    fn texts(language: &SyntheticLanguage, split: Split, bytes: usize) -> Vec<String> {
        language.documents(split, bytes).map(|d| d.text).collect()
    }

    /// The (from, to) state pairs of a document, boundary to boundary.
    fn transitions_of(language: &SyntheticLanguage, text: &str) -> Vec<(usize, usize)> {
        let words = language.parse(text).expect("a generated text parses");
        let states: Vec<usize> = [BOUNDARY].into_iter().chain(words).chain([BOUNDARY]).collect();
        states.windows(2).map(|pair| (pair[0], pair[1])).collect()
    }

    /// Σy / Σx over independent (y, x) samples, with its standard error by the delta
    /// method: the spread of y - ratio·x between samples, scaled by the mean x.
    fn ratio_with_standard_error(samples: &[(f64, f64)]) -> (f64, f64) {
        let n = samples.len() as f64;
        let sum_y: f64 = samples.iter().map(|s| s.0).sum();
        let sum_x: f64 = samples.iter().map(|s| s.1).sum();
        let ratio = sum_y / sum_x;
        let variance = samples.iter().map(|(y, x)| (y - ratio * x).powi(2)).sum::<f64>() / (n - 1.0);
        (ratio, (variance / n).sqrt() / (sum_x / n))
    }

    #[test]
    fn default_corpus_is_unchanged() {
        // Golden values, computed once from this code. Cached token files and the
        // tokenizer trained on them depend on the exact text: a change here must be
        // deliberate, and should come with a new DEFAULT_SEED or a cache version bump.
        let language = default_language();
        let train: Vec<Document> = language.documents(Split::Train, DEFAULT_TRAIN_BYTES).collect();
        assert!(train[0].text.starts_with("Staibel koku lostai timi zaika kohi kaistouri zoustu.\nNishou rufilgi bapir.\n"));
        assert_eq!(train.len(), 7541);
        assert_eq!(train.iter().map(|d| d.text.len()).sum::<usize>(), 4195022);
        assert!((train[0].nll_nats - 96.3798478856087).abs() < 1e-9);
    }

    #[test]
    fn vocabulary_is_distinct_lowercase_words() {
        let language = default_language();
        let vocabulary = language.vocabulary();
        assert_eq!(vocabulary.len(), VOCABULARY_SIZE);
        assert!(vocabulary.iter().all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
        assert_eq!(vocabulary.iter().collect::<HashSet<_>>().len(), vocabulary.len());
    }

    #[test]
    fn same_seed_gives_identical_documents() {
        let first: Vec<Document> = default_language().documents(Split::Train, 1 << 18).collect();
        let second: Vec<Document> = default_language().documents(Split::Train, 1 << 18).collect();
        assert_eq!(first, second);
    }

    #[test]
    fn different_seeds_give_different_languages() {
        let (a, b) = (SyntheticLanguage::new(1), SyntheticLanguage::new(2));
        assert_ne!(a.vocabulary(), b.vocabulary());
        assert_ne!(a.entropy_rate(), b.entropy_rate());
        assert_ne!(texts(&a, Split::Train, 4096), texts(&b, Split::Train, 4096));
    }

    #[test]
    fn splits_differ() {
        let language = default_language();
        let [train, valid, test] = [Split::Train, Split::Valid, Split::Test].map(|s| texts(&language, s, 1 << 16));
        assert_ne!(train, valid);
        assert_ne!(train, test);
        assert_ne!(valid, test);
        // Long documents would coincide across splits only if the streams overlapped.
        let long_train: HashSet<&String> = train.iter().filter(|t| t.len() > 200).collect();
        assert!(valid.iter().chain(&test).all(|t| !long_train.contains(t)));
    }

    #[test]
    fn document_nll_equals_the_nll_of_its_parsed_text() {
        let language = default_language();
        for split in [Split::Train, Split::Valid, Split::Test] {
            for document in language.documents(split, DEFAULT_EVAL_BYTES) {
                // Bit for bit: both add the same stored costs in the same order.
                assert_eq!(language.nll_of_text(&document.text), Some(document.nll_nats), "{}", document.text);
                assert_eq!(language.parse(&document.text).map(|w| w.len()), Some(document.words));
            }
        }
    }

    #[test]
    fn text_the_source_cannot_produce_has_no_nll() {
        let language = default_language();
        let document = language.documents(Split::Valid, 1).next().unwrap();
        let text = &document.text;
        assert!(text.contains(".\n"), "the test needs a document of two sentences or more");
        let mut lowercase_start = text.clone();
        lowercase_start[..1].make_ascii_lowercase();
        let rejected = [
            String::new(),
            format!("{text} "),
            format!(" {text}"),
            format!("{text}\n"),
            text.replacen(' ', "  ", 1),
            text.replacen(".\n", ". ", 1),
            text.replacen(".\n", "\n", 1),
            text.strip_suffix('.').unwrap().to_string(),
            lowercase_start,
            text.to_uppercase(),
            format!("Xyzzy {text}"),
            format!("{text}<|endoftext|>"),
        ];
        for bad in &rejected {
            assert_eq!(language.nll_of_text(bad), None, "{bad:?}");
        }

        // Well-formed text with a transition of probability zero.
        let mut words = language.parse(text).unwrap();
        let impossible = (0..VOCABULARY_SIZE).find(|w| !language.transitions[words[0]].next.contains(w)).unwrap();
        words[1] = impossible;
        let rendered = language.render(&words);
        assert!(language.parse(&rendered).is_some());
        assert_eq!(language.nll_of_text(&rendered), None);

        // A document cannot end on a word that does not end a sentence.
        let open_ended = language.transitions[BOUNDARY].next.iter().find(|&&w| !language.sentence_final[w]).unwrap();
        assert_eq!(language.nll_of_text(&language.render(&[*open_ended])), None);
    }

    #[test]
    fn documents_are_clean_and_never_hold_the_separator() {
        let language = default_language();
        for (split, bytes) in [(Split::Train, DEFAULT_TRAIN_BYTES), (Split::Valid, DEFAULT_EVAL_BYTES), (Split::Test, DEFAULT_EVAL_BYTES)] {
            for document in language.documents(split, bytes) {
                let text = &document.text;
                assert!(!text.contains("<|endoftext|>"));
                assert!(!text.is_empty() && text.trim() == text && text.ends_with('.'), "{text:?}");
                assert!(document.words >= 1);
            }
        }
    }

    #[test]
    fn sizes_land_near_the_target() {
        let language = default_language();
        assert_eq!(language.documents(Split::Valid, 0).count(), 0);
        for target in [1, 1000, 100_000, DEFAULT_EVAL_BYTES, DEFAULT_TRAIN_BYTES] {
            let lengths: Vec<usize> = language.documents(Split::Valid, target).map(|d| d.text.len()).collect();
            let total: usize = lengths.iter().sum();
            // At or past the target, and short of it without the last document.
            assert!(total >= target && total - lengths.last().unwrap() < target, "{target}: {total}");
        }
    }

    #[test]
    fn stationary_distribution_is_a_fixed_point() {
        let language = default_language();
        let pi = &language.stationary;
        let mut stepped = vec![0.0; pi.len()];
        for (from, row) in language.transitions.iter().enumerate() {
            for (&to, &p) in row.next.iter().zip(&row.probability) {
                stepped[to] += pi[from] * p;
            }
        }
        let residual: f64 = pi.iter().zip(&stepped).map(|(a, b)| (a - b).abs()).sum();
        assert!(residual < 1e-12, "{residual}");
        assert!((pi.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Every state recurs: the cycle makes the chain irreducible.
        assert!(pi.iter().all(|&p| p > 0.0));
    }

    #[test]
    fn mean_nll_per_word_event_matches_the_entropy_rate() {
        let language = default_language();
        let documents: Vec<(f64, f64, f64)> =
            language.documents(Split::Train, DEFAULT_TRAIN_BYTES).map(|d| (d.nll_nats, d.events() as f64, d.words as f64)).collect();
        let per_event: Vec<(f64, f64)> = documents.iter().map(|d| (d.0, d.1)).collect();
        let (nll_per_event, standard_error) = ratio_with_standard_error(&per_event);
        // Documents are independent cycles of the chain through END, so the spread
        // between documents gives the standard error of Σ nll / Σ events; over the
        // 7,500 documents of the default train split it is about 0.001 nats. Five
        // standard errors fail by chance about once in two million runs for a normal
        // estimate, yet stay far tighter than the errors this guards against: leaving
        // the END events out of the count moves the mean by 0.03 nats, leaving out
        // the first-word row's entropy by 0.04.
        assert!(standard_error < 0.005, "{standard_error}");
        let gap = nll_per_event - language.entropy_rate();
        assert!(gap.abs() < 5.0 * standard_error, "{nll_per_event} vs {}: gap {gap}, se {standard_error}", language.entropy_rate());

        // The same for document length: END recurs every 1/π(END) events.
        let per_document: Vec<(f64, f64)> = documents.iter().map(|d| (d.2, 1.0)).collect();
        let (mean_words, standard_error) = ratio_with_standard_error(&per_document);
        let gap = mean_words - language.mean_words_per_document();
        assert!(gap.abs() < 5.0 * standard_error, "{mean_words} vs {}: se {standard_error}", language.mean_words_per_document());
    }

    #[test]
    fn a_bigram_model_counted_on_train_reaches_the_entropy_rate_on_valid() {
        let language = default_language();
        let states = VOCABULARY_SIZE + 1;
        let mut pair_counts = vec![0u64; states * states];
        for document in language.documents(Split::Train, DEFAULT_TRAIN_BYTES) {
            for (from, to) in transitions_of(&language, &document.text) {
                pair_counts[from * states + to] += 1;
            }
        }
        let from_counts: Vec<u64> = pair_counts.chunks(states).map(|row| row.iter().sum()).collect();
        let to_counts: Vec<u64> = (0..states).map(|to| (0..states).map(|from| pair_counts[from * states + to]).sum()).collect();
        let all_events: u64 = from_counts.iter().sum();

        // Add-k smoothing over all 321 outcomes; a small k because every context is
        // seen hundreds of times or more.
        const K: f64 = 0.01;
        let smoothed = |count: u64, total: u64| (count as f64 + K) / (total as f64 + K * states as f64);
        let (mut source_nll, mut bigram_nll, mut unigram_nll, mut events) = (0.0, 0.0, 0.0, 0usize);
        for document in language.documents(Split::Valid, DEFAULT_EVAL_BYTES) {
            source_nll += document.nll_nats;
            for (from, to) in transitions_of(&language, &document.text) {
                bigram_nll -= smoothed(pair_counts[from * states + to], from_counts[from]).ln();
                unigram_nll -= smoothed(to_counts[to], all_events).ln();
                events += 1;
            }
        }
        let [source, bigram, unigram] = [source_nll, bigram_nll, unigram_nll].map(|nll| nll / events as f64);
        println!(
            "per word event on valid: source {source:.4}, bigram {bigram:.4}, unigram {unigram:.4}, entropy rate {:.4}",
            language.entropy_rate()
        );

        // Counted probabilities can only lose to the true ones on average (by the KL
        // divergence); with about 7,000 transitions estimated from 626,000 events the
        // loss is near #parameters / (2 · events) ≈ 0.006 nats, plus a little for the
        // smoothing (0.008 measured), so 0.05 is a wide margin that still leaves no
        // room for structure beyond the previous word.
        assert!(source < bigram && bigram < source + 0.05, "source {source}, bigram {bigram}");
        // The valid sample itself sits within a few standard errors (0.004 nats for
        // its 39,000 events) of the entropy rate: 0.03 is about seven.
        assert!((source - language.entropy_rate()).abs() < 0.03);
        // And the previous word matters: without it a model does far worse.
        assert!(unigram > language.entropy_rate() + 1.0, "unigram {unigram}");
    }
}
