"""Builders of tiny real components for tests, benchmarks and the offline demo.

Nothing here is a mock: the models are real transformers/sentence-transformers objects with random weights,
saved in their normal on-disk formats, so every code path that loads them is the production one.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_olmo2_config(*, vocab_size: int = 512, hidden_size: int = 64, intermediate_size: int = 128,
                      num_layers: int = 2, num_heads: int = 4, max_position_embeddings: int = 256):
    """A 2-layer OLMo-2 config that runs in milliseconds on CPU."""
    from transformers import Olmo2Config

    return Olmo2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=1, eos_token_id=0, bos_token_id=None,
        tie_word_embeddings=False, rope_theta=500000.0,
    )


def save_random_olmo2(out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Save a random dense `Olmo2ForCausalLM` (no tokenizer) with `save_pretrained`."""
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(tiny_olmo2_config(**config_kwargs)).to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def build_random_embedder(out_dir: str | Path, *, dim: int = 32, seed: int = 0, max_seq_length: int = 128) -> Path:
    """Save a random 2-layer BERT with mean pooling as a sentence-transformers folder.

    The word-piece vocabulary is built from printable ASCII plus common English fragments, so real text
    tokenizes into many distinct ids and different domains get different mean embeddings.
    """
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_hf"
    work.mkdir(exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    frags = ["the", "and", "def", "self", "return", "import", "of", "to", "in", "that", "is", "for", "shall",
             "lord", "god", "state", "nation", "congress", "class", "if", "else", "print", "law", "license"]
    vocab = specials + chars + ["##" + c for c in chars] + frags + ["##" + f for f in frags]
    (work / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(work / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=2 * dim,
                                max_position_embeddings=max(512, max_seq_length)))
    bert.save_pretrained(work)
    tokenizer.save_pretrained(work)
    word = models.Transformer(str(work), max_seq_length=max_seq_length)
    dim_of = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    pooling = models.Pooling(dim_of(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(out))
    import shutil

    shutil.rmtree(work)
    return out
