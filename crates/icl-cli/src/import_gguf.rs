//! `icl import-gguf FILE --out DIR`: a llama.cpp GGUF checkpoint (Llama architecture) as a Hugging Face
//! folder — `config.json` (the [`LlamaConfig`] of [`GgufFile::llama_params`], serialized),
//! `model.safetensors` (f32 or bf16), a `tokenizer.json` built from the GGUF's tokenizer metadata, and
//! `chat_template.jinja` from `tokenizer.chat_template` when the GGUF has one.
//!
//! Tensors are dequantized and written one at a time (the safetensors header goes first), so the
//! import holds one tensor, not the model. The folder is built next to `DIR` and renamed into place,
//! so `DIR` is either absent or complete.

use crate::DtypeArg;
use anyhow::{bail, Context, Result};
use icl_models::gguf::{GgufFile, LlamaTensorPlan};
use icl_models::{LlamaConfig, SafetensorsWriter};
use serde_json::json;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct ImportGgufArgs {
    /// A GGUF file (v2 or v3) of the Llama architecture; tensors in F32, F16, BF16, Q8_0, Q4_0 or Q4_1.
    pub file: PathBuf,
    /// The Hugging Face folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of model.safetensors.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Replace DIR if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ImportGgufArgs) -> Result<()> {
    let started = std::time::Instant::now();
    if args.out.exists() && !args.force {
        bail!("{} exists (--force replaces it)", args.out.display());
    }
    let gguf = GgufFile::open(&args.file)?;
    let config = gguf.llama_params()?;
    let plan = gguf.llama_plan(&config)?;
    // Everything that can fail on the file's content is checked before the first byte is written.
    let tokenizer = build_tokenizer(&gguf, config.vocab_size as usize)?;

    let name = args.out.file_name().with_context(|| format!("{}: not a folder name", args.out.display()))?;
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = write_folder(&gguf, &config, &plan, &tokenizer, args.dtype, &tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    replace_dir(&tmp, &args.out)?;
    let bytes = std::fs::metadata(args.out.join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "icl import-gguf: {} -> {} ({} tensors, {:.1} MB {}, {:.1}s)",
        args.file.display(),
        args.out.display(),
        plan.len(),
        bytes as f64 / 1e6,
        args.dtype.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Renames `tmp` to `out`, moving an existing `out` aside first and deleting it after.
fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    let old = out.with_file_name(format!(
        ".{}.old-{}",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
    }
    std::fs::rename(tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    if had_old {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn write_folder(
    gguf: &GgufFile,
    config: &LlamaConfig,
    plan: &[LlamaTensorPlan],
    tokenizer: &Tokenizer,
    dtype: DtypeArg,
    dir: &Path,
) -> Result<()> {
    // The GGUF's config with the dtype written, in transformers 4's and 5's spelling.
    let dtype_name = match dtype {
        DtypeArg::F32 => "float32",
        DtypeArg::Bf16 => "bfloat16",
    };
    let mut config = config.clone();
    (config.torch_dtype, config.dtype) = (Some(dtype_name.into()), Some(dtype_name.into()));
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;

    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(config.bos_token_id),
        "eos_token": token(config.eos_token_id),
        "pad_token": token(config.pad_token_id),
        "unk_token": token(gguf.meta_u64("tokenizer.ggml.unknown_token_id")?.map(|i| i as u32)),
        "model_max_length": config.max_position_embeddings,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer_config)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    // The chat template as transformers 5 saves one: `chat_template.jinja`, not a config key.
    if let Some(template) = gguf.meta_str("tokenizer.chat_template")? {
        let path = dir.join("chat_template.jinja");
        std::fs::write(&path, template).with_context(|| format!("writing {}", path.display()))?;
    }

    let st_dtype = match dtype {
        DtypeArg::F32 => safetensors::Dtype::F32,
        DtypeArg::Bf16 => safetensors::Dtype::BF16,
    };
    let specs: Vec<_> = plan.iter().map(|t| (t.hf_name.clone(), st_dtype, t.shape.clone())).collect();
    let mut writer = SafetensorsWriter::create(&dir.join("model.safetensors"), &specs)?;
    let mut bytes = Vec::new();
    for tensor in plan {
        // Pieces of ~4 MB of f32: the import holds one piece, the q/k matrix being converted, and the map.
        gguf.read_llama_tensor_chunks(tensor, 1 << 20, |values| {
            bytes.clear();
            match dtype {
                DtypeArg::F32 => bytes.extend(values.iter().flat_map(|v| v.to_le_bytes())),
                // Round to nearest even, as torch's `.to(torch.bfloat16)` does.
                DtypeArg::Bf16 => bytes.extend(values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())),
            }
            writer.write_part(&tensor.hf_name, &bytes)
        })?;
    }
    writer.finish()?;
    Ok(())
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others map to
/// U+0100 onwards, so every byte string is spelled in visible characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

// Pre-tokenizer regexes of llama.cpp's `llama-vocab.cpp` for the `tokenizer.ggml.pre` values below.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`, as a `tokenizers` pre-tokenizer.
///
/// `smollm` (and the StarCoder family) split every digit off first, then apply GPT-2's regex: that
/// is SmolLM2's own `tokenizer.json` (`Digits(individual_digits)` then `ByteLevel`). transformers'
/// GGUF loader has no entry for `smollm` and uses plain `ByteLevel`; the two differ only on two or more
/// spaces before a digit (`"x  1"`: `x ĠĠ 1` here and in llama.cpp, `x Ġ Ġ 1` there), since the
/// vocabulary has no token mixing a digit with anything else.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![split.into(), byte_level(false)])))
    };
    Ok(match pre {
        // `ByteLevel` with its regex is GPT-2's split.
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level(true)]))
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => split(LLAMA3_SPLIT)?,
        "qwen2" | "deepseek-r1-qwen" | "megrez" => split(QWEN2_SPLIT)?,
        other => bail!("unsupported pre-tokenizer `{other}` (tokenizer.ggml.pre)"),
    })
}

/// The tokenizer a `tokenizer.ggml.model = "gpt2"` file describes: byte-level BPE over its tokens and
/// merges, the pre-tokenizer its `tokenizer.ggml.pre` names, control tokens (type 3) as special added
/// tokens and user-defined ones (type 4) as plain added tokens, and BOS/EOS added by the
/// post-processor only where `add_bos_token`/`add_eos_token` say so.
pub fn build_tokenizer(gguf: &GgufFile, vocab_size: usize) -> Result<Tokenizer> {
    let path = gguf.path().display();
    let model = gguf.require("tokenizer.ggml.model", gguf.meta_str("tokenizer.ggml.model"))?;
    if model != "gpt2" {
        bail!("{path}: unsupported tokenizer model `{model}` (tokenizer.ggml.model; supported: gpt2, byte-level BPE)");
    }
    let tokens = gguf.require("tokenizer.ggml.tokens", gguf.meta_strings("tokenizer.ggml.tokens"))?;
    let merges = gguf.require("tokenizer.ggml.merges", gguf.meta_strings("tokenizer.ggml.merges"))?;
    if tokens.len() > vocab_size {
        bail!("{path}: {} tokens (tokenizer.ggml.tokens) but the model has {vocab_size} embeddings", tokens.len());
    }
    let types = gguf.meta_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        bail!("{path}: {} token types (tokenizer.ggml.token_type) for {} tokens", types.len(), tokens.len());
    }
    let pre = gguf.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");

    let spelling = bytes_to_unicode();
    let in_alphabet = |t: &str| t.chars().all(|c| spelling.contains(&c));
    // Tokens are stored in the byte alphabet already; one that is not (a special token with other
    // characters) is spelled from its UTF-8 bytes, as transformers does.
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let key =
            if in_alphabet(token) { token.clone() } else { token.bytes().map(|b| spelling[b as usize]).collect() };
        vocab.insert(key, id as u32);
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).with_context(|| {
                format!("{path}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{path}: building the BPE model from tokenizer.ggml.tokens/merges: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre).with_context(|| path.to_string())?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // 3 = CONTROL, 4 = USER_DEFINED (llama.cpp's token types). A control token spelled outside the byte
    // alphabet is a mislabelled vocabulary entry, not text to match (transformers skips it too).
    let of_type = |want: i64| {
        tokens.iter().zip(&types).filter(move |&(t, &ty)| ty == want && in_alphabet(t)).map(|(t, _)| t.clone())
    };
    let control: Vec<AddedToken> = of_type(3).map(|t| AddedToken::from(t, true).normalized(false)).collect();
    let user: Vec<AddedToken> = of_type(4).map(|t| AddedToken::from(t, false).normalized(false)).collect();
    tokenizer.add_special_tokens(&control);
    tokenizer.add_tokens(&user);

    let special = |key: &str| -> Result<Option<(String, u32)>> {
        let id_key = format!("tokenizer.ggml.{key}_token_id");
        let add = gguf.meta_bool(&format!("tokenizer.ggml.add_{key}_token"))?.unwrap_or(false);
        match (add, gguf.meta_u64(&id_key)?) {
            (false, _) => Ok(None),
            (true, None) => bail!("{path}: tokenizer.ggml.add_{key}_token is set but {id_key} is missing"),
            (true, Some(id)) => {
                let token =
                    tokens.get(id as usize).with_context(|| format!("{path}: {id_key} = {id} is not a token"))?;
                Ok(Some((token.clone(), id as u32)))
            }
        }
    };
    let (bos, eos) = (special("bos")?, special("eos")?);
    if bos.is_some() || eos.is_some() {
        let mut single: Vec<String> = Vec::new();
        let mut pair: Vec<String> = Vec::new();
        let specials: Vec<(String, u32)> = bos.iter().chain(&eos).cloned().collect();
        if let Some((b, _)) = &bos {
            single.push(b.clone());
            pair.push(b.clone());
        }
        single.push("$A".into());
        pair.push("$A".into());
        if let Some((e, _)) = &eos {
            single.push(e.clone());
            pair.push(e.clone());
        }
        pair.push("$B:1".into());
        let template = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| anyhow::anyhow!("{path}: BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow::anyhow!("{path}: BOS/EOS template: {e}"))?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!((t[b'a' as usize], t[b' ' as usize], t[b'\n' as usize], t[0]), ('a', 'Ġ', 'Ċ', 'Ā'));
        let mut seen: Vec<char> = t.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256, "a bijection");
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).expect("known").pre_tokenize(&mut s).expect("pre-tokenize");
        s.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_owned())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_llama_cpp() {
        assert_eq!(pieces("gpt2", "In 1984,  x"), ["In", "Ġ1984", ",", "Ġ", "Ġx"]);
        // smollm: digits one by one, and whitespace before a digit stays one piece.
        assert_eq!(pieces("smollm", "In 1984"), ["In", "Ġ", "1", "9", "8", "4"]);
        assert_eq!(pieces("smollm", "x  1"), ["x", "ĠĠ", "1"]);
        assert_eq!(pieces("llama3", "I'VE 12345 dogs"), ["I", "'VE", "Ġ", "123", "45", "Ġdogs"]);
        assert_eq!(pieces("qwen2", "ab 12"), ["ab", "Ġ", "1", "2"]);
        assert!(pre_tokenizer("no-such-pre").is_err());
    }
}
