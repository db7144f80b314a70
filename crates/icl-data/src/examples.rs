//! What a task is: its type ([`TaskKind`], llm-foundry's `icl_task_type`), its examples, one struct
//! per type, and a read [`Task`]. No reading or writing here: [`crate::read_task`] reads and validates
//! task files, [`crate::write_task`] writes them.

use std::path::PathBuf;

/// The task types this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// `{context, continuation}`: is the continuation the model's greedy completion?
    LanguageModeling,
    /// `{query, choices[], gold}`: which choice is most likely after the query?
    MultipleChoice,
    /// `{context_options[], continuation, gold}`: after which context is the shared continuation most
    /// likely (Winograd schemas, Winogrande)?
    Schema,
    /// `{context, answer, aliases[]}` (TriviaQA): does the greedy generation after the context start
    /// with the answer or an alias (after normalization)? `aliases` may be absent.
    GenerationWithAnswers,
    /// `{text}`: the log-likelihood of the whole document, scored in lm-evaluation-harness's rolling
    /// windows (`loglikelihood_rolling`); word and byte perplexity, bits per byte.
    Perplexity,
}

impl TaskKind {
    pub const ALL: [TaskKind; 5] =
        [Self::LanguageModeling, Self::MultipleChoice, Self::Schema, Self::GenerationWithAnswers, Self::Perplexity];

    /// llm-foundry's `icl_task_type` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::LanguageModeling => "language_modeling",
            Self::MultipleChoice => "multiple_choice",
            Self::Schema => "schema",
            Self::GenerationWithAnswers => "generation_task_with_answers",
            Self::Perplexity => "perplexity",
        }
    }

    /// Parses an `icl_task_type`; the error says what is known and what is not supported yet.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        match name {
            "language_modeling" => Ok(Self::LanguageModeling),
            "multiple_choice" => Ok(Self::MultipleChoice),
            "schema" => Ok(Self::Schema),
            // llm-foundry's older name for the same type.
            "generation_task_with_answers" | "question_answering" => Ok(Self::GenerationWithAnswers),
            "perplexity" => Ok(Self::Perplexity),
            "code_evaluation" => Err(format!("task type `{name}` is not supported yet")),
            other => Err(format!(
                "unknown task type `{other}` (expected language_modeling, multiple_choice, schema, \
                 generation_task_with_answers or perplexity)"
            )),
        }
    }

    /// The canonical fields of a row of this type.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Self::LanguageModeling => &["context", "continuation"],
            Self::MultipleChoice => &["query", "choices", "gold"],
            Self::Schema => &["context_options", "continuation", "gold"],
            Self::GenerationWithAnswers => &["context", "answer", "aliases"],
            Self::Perplexity => &["text"],
        }
    }

    /// Fields a row of this type may leave out.
    pub fn optional_fields(self) -> &'static [&'static str] {
        match self {
            Self::GenerationWithAnswers => &["aliases"],
            _ => &[],
        }
    }

    /// The type whose fields a set of (canonical) field names shows: the distinguishing fields are
    /// `context_options` (schema), `query`/`choices` (multiple choice), `answer`/`aliases`
    /// (generation with answers), `context` (language modelling) and `text` (perplexity).
    pub fn detect(has: impl Fn(&str) -> bool) -> Option<Self> {
        if has("context_options") {
            Some(Self::Schema)
        } else if has("choices") || has("query") {
            Some(Self::MultipleChoice)
        } else if has("answer") || has("aliases") {
            Some(Self::GenerationWithAnswers)
        } else if has("context") {
            Some(Self::LanguageModeling)
        } else if has("text") {
            Some(Self::Perplexity)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LmExample {
    pub context: String,
    pub continuation: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceExample {
    pub query: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchemaExample {
    pub context_options: Vec<String>,
    pub continuation: String,
    pub gold: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationExample {
    pub context: String,
    pub answer: String,
    /// Other accepted answers (may repeat `answer`).
    pub aliases: Vec<String>,
    /// The worked solution (gsm8k, svamp: llm-foundry's `chain_of_thought`): shots show
    /// `chain_of_thought + cot_delimiter + answer`. Every row of a file has one or none does.
    pub chain_of_thought: Option<String>,
}

impl GenerationExample {
    /// The accepted answers: `answer`, then the aliases, without repeats (llm-foundry's set).
    pub fn accepted(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(1 + self.aliases.len());
        for a in std::iter::once(&self.answer).chain(&self.aliases) {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// A document scored whole (lm-evaluation-harness's `loglikelihood_rolling` on `doc_to_target`).
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityExample {
    pub text: String,
}

/// The rows of a task file, in file order: row `i` is example index `i`.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskExamples {
    LanguageModeling(Vec<LmExample>),
    MultipleChoice(Vec<ChoiceExample>),
    Schema(Vec<SchemaExample>),
    GenerationWithAnswers(Vec<GenerationExample>),
    Perplexity(Vec<PerplexityExample>),
}

impl TaskExamples {
    /// The number of examples.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::LanguageModeling(v) => v.len(),
            Self::MultipleChoice(v) => v.len(),
            Self::Schema(v) => v.len(),
            Self::GenerationWithAnswers(v) => v.len(),
            Self::Perplexity(v) => v.len(),
        }
    }

    /// A string equal for two rows exactly when their fields are (lm-eval's `==` on docs, over the
    /// fields a task reads).
    pub(crate) fn row_key(&self, i: usize) -> String {
        match self {
            Self::LanguageModeling(v) => format!("{:?}", v[i]),
            Self::MultipleChoice(v) => format!("{:?}", v[i]),
            Self::Schema(v) => format!("{:?}", v[i]),
            Self::GenerationWithAnswers(v) => format!("{:?}", v[i]),
            Self::Perplexity(v) => format!("{:?}", v[i]),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub path: PathBuf,
    pub examples: TaskExamples,
}

impl Task {
    pub fn kind(&self) -> TaskKind {
        match self.examples {
            TaskExamples::LanguageModeling(_) => TaskKind::LanguageModeling,
            TaskExamples::MultipleChoice(_) => TaskKind::MultipleChoice,
            TaskExamples::Schema(_) => TaskKind::Schema,
            TaskExamples::GenerationWithAnswers(_) => TaskKind::GenerationWithAnswers,
            TaskExamples::Perplexity(_) => TaskKind::Perplexity,
        }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(number of options, gold option)` of example `i` for multiple-choice and schema tasks.
    pub fn choice(&self, i: usize) -> Option<(usize, usize)> {
        match &self.examples {
            TaskExamples::LanguageModeling(_)
            | TaskExamples::GenerationWithAnswers(_)
            | TaskExamples::Perplexity(_) => None,
            TaskExamples::MultipleChoice(v) => v.get(i).map(|e| (e.choices.len(), e.gold)),
            TaskExamples::Schema(v) => v.get(i).map(|e| (e.context_options.len(), e.gold)),
        }
    }
}
