"""Prompt functions for the icl_* lm-eval tasks (copied next to the generated YAMLs by scripts/lm_eval_tasks.py).

Requests produced (zero-shot):
    icl_lambada:               (context.strip(), " " + continuation.strip())
    icl_piqa / icl_hellaswag:  (query.strip(), " " + choice.strip()) for each choice; target delimiter " ".
    icl_winograd (schema):     (option.strip(), " " + continuation.strip()) for each context option.
    icl_triviaqa (generation): context.strip(), generated until a newline; shots show answer.strip().
"""


def lm_context(doc):
    return doc["context"].strip()


def lm_target(doc):
    # loglikelihood tasks do not prepend target_delimiter, so the space is added here
    return " " + doc["continuation"].strip()


def mc_context(doc):
    return doc["query"].strip()


def mc_choices(doc):
    return [c.strip() for c in doc["choices"]]


def mc_gold(doc):
    return int(doc["gold"])


def schema_gold(doc):
    # An int from doc_to_text puts lm-eval in multiple-input mode; it is also the gold index.
    return int(doc["gold"])


def schema_contexts(doc):
    return [c.strip() for c in doc["context_options"]]


def schema_continuation(doc):
    return doc["continuation"].strip()


def gen_context(doc):
    return doc["context"].strip()


def gen_answer(doc):
    return doc["answer"].strip()
