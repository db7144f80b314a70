//! Exact match of generated answers (TriviaQA-style question answering), as llm-foundry's
//! `InContextLearningGenerationExactMatchAccuracy` scores it.
//!
//! An output is correct when its normalized form starts with the normalized form of any accepted
//! answer (the answer or one of its aliases). Normalization (SQuAD's, with llm-foundry's additions):
//! underscores become spaces, lower case, every ASCII punctuation character and the quotes `‘ ’ ´ ``
//! become spaces, the words `a`, `an` and `the` become spaces, and white space is collapsed to single
//! spaces with none at either end.
//!
//! llm-foundry's other options: with `do_normalization: false` answers are compared with white space
//! stripped (Python's `str.strip()`) and nothing else ([`answer_matches`]); with a `cot_delimiter`
//! the answer is the text after its last occurrence in the output ([`cot_answer`]), after the cut at
//! the first stop sequence.

use crate::{Mean, Reducible, Result};
use tch::Tensor;

/// Python's `str.split()` white space: Unicode white space and the separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `string.punctuation` plus the quote marks llm-foundry adds.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '\u{2018}' | '\u{2019}' | '\u{b4}' | '`')
}

/// A character of a regex word (`\w` without underscores, which are gone by then).
fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// The normalized form of an answer (see the module documentation).
pub fn normalize_answer(text: &str) -> String {
    let cleaned: String =
        text.replace('_', " ").to_lowercase().chars().map(|c| if is_punctuation(c) { ' ' } else { c }).collect();
    // Articles are whole words: maximal runs of word characters equal to a, an or the.
    let mut without_articles = String::with_capacity(cleaned.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in cleaned.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut without_articles);
            without_articles.push(c);
        }
    }
    flush(&mut word, &mut without_articles);
    without_articles.split(is_py_space).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Whether `output` is correct: its normalized form starts with any normalized answer.
pub fn exact_match<S: AsRef<str>>(output: &str, answers: &[S]) -> bool {
    let output = normalize_answer(output);
    answers.iter().any(|a| output.starts_with(&normalize_answer(a.as_ref())))
}

/// Whether `output` is correct, normalized or (llm-foundry's `do_normalization: false`) only
/// stripped of white space at both ends.
pub fn answer_matches<S: AsRef<str>>(output: &str, answers: &[S], normalize: bool) -> bool {
    if normalize {
        return exact_match(output, answers);
    }
    let output = output.trim_matches(is_py_space);
    answers.iter().any(|a| output.starts_with(a.as_ref().trim_matches(is_py_space)))
}

/// The answer in a chain-of-thought output: the text after the last `cot_delimiter` (Python's
/// `output.split(cot_delimiter)[-1]`), the whole output without one or when the delimiter is empty.
pub fn cot_answer<'a>(output: &'a str, cot_delimiter: &str) -> &'a str {
    if cot_delimiter.is_empty() {
        return output;
    }
    output.rsplit(cot_delimiter).next().unwrap_or(output)
}

/// `output` up to (not including) the first occurrence of any of `stops` (llm-foundry splits the
/// generated text at its `early_stopping_criteria`); empty stop strings are ignored.
pub fn cut_at_stop<'a, S: AsRef<str>>(output: &'a str, stops: &[S]) -> &'a str {
    let end = stops
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| !s.is_empty())
        .filter_map(|s| output.find(s))
        .min()
        .unwrap_or(output.len());
    &output[..end]
}

/// Accumulated exact-match accuracy of generation tasks.
#[derive(Debug, Default, Clone)]
pub struct GenerationMetrics {
    pub exact_match: Mean,
}

impl GenerationMetrics {
    /// Adds a batch of per-example results (bool or 0/1 tensor, any shape).
    pub fn update(&mut self, correct: &Tensor) -> Result<()> {
        self.exact_match.update(correct)
    }
}

impl Reducible for GenerationMetrics {
    fn to_tensor(&self) -> Tensor {
        crate::pack(&[&self.exact_match])
    }
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let [exact_match] = crate::unpack::<1>(t)?;
        Ok(Self { exact_match })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_follows_squad_and_llm_foundry() {
        assert_eq!(normalize_answer("  The  Beatles! "), "beatles");
        assert_eq!(normalize_answer("A Tale of Two Cities"), "tale of two cities");
        assert_eq!(normalize_answer("an_apple"), "apple");
        // Articles only as whole words; punctuation splits words first.
        assert_eq!(normalize_answer("Theatre, anthem & a.b."), "theatre anthem b");
        assert_eq!(normalize_answer("Don‘t ´stop` ‘me’"), "don t stop me");
        assert_eq!(normalize_answer("ÉCOLE\tNormale\n"), "école normale");
        assert_eq!(normalize_answer("\u{1f}x\u{a0}y"), "x y");
        assert_eq!(normalize_answer("The"), "");
        assert_eq!(normalize_answer(""), "");
    }

    #[test]
    fn chain_of_thought_and_unnormalized_answers() {
        let out = " 16 - 3 - 4 = 9 eggs. The answer is 18.";
        assert_eq!(cot_answer(out, "The answer is "), "18.");
        assert_eq!(cot_answer("The answer is 1. The answer is 2", "The answer is "), "2");
        assert_eq!(cot_answer("no delimiter", "The answer is "), "no delimiter");
        assert_eq!(cot_answer("x", ""), "x");
        assert!(answer_matches(" 18.\n", &["18"], false));
        assert!(!answer_matches("The 18", &["18"], false));
        assert!(answer_matches("The 18", &["18"], true));
        // Case and punctuation count without normalization.
        assert!(!answer_matches("paris", &["Paris"], false));
        assert!(answer_matches(" Paris ", &[" Paris"], false));
    }

    #[test]
    fn correct_when_the_output_starts_with_an_answer() {
        assert!(exact_match(" David Seville and the Chipmunks", &["David Seville"]));
        assert!(exact_match("scorpio.", &["Scorpio", "Skorpio"]));
        assert!(exact_match(" Skorpio", &["Scorpio", "Skorpio"]));
        assert!(!exact_match(" Leo", &["Scorpio", "Skorpio"]));
        // Prefix of the normalized text, not of words: "sunset blvd" matches "Sunset Blvd." only.
        assert!(exact_match("Sunset Blvd", &["Sunset Blvd."]));
        assert!(!exact_match("Sunset", &["Sunset Boulevard"]));
        assert!(!exact_match("anything", &[] as &[&str]));
    }

    #[test]
    fn cuts_at_the_first_stop_sequence() {
        assert_eq!(cut_at_stop(" Paris\nQuestion: x", &["\n"]), " Paris");
        assert_eq!(cut_at_stop("a.b\nc", &["\n", "."]), "a");
        assert_eq!(cut_at_stop("abc", &["", "z"]), "abc");
    }

    #[test]
    fn metrics_merge_and_round_trip() {
        let mut a = GenerationMetrics::default();
        a.update(&Tensor::from_slice(&[true, false, true])).unwrap();
        let mut b = GenerationMetrics::default();
        b.update(&Tensor::from_slice(&[true])).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.exact_match.value(), 0.75);
        let back = GenerationMetrics::from_tensor(&a.to_tensor()).unwrap();
        assert_eq!((back.exact_match.value(), back.exact_match.count()), (0.75, 4.0));
        assert!(GenerationMetrics::from_tensor(&Tensor::from_slice(&[1.0f64, 2.0, 3.0])).is_err());
    }
}
