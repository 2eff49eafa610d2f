"""smarter_fast: fast multi-task fine-tuning of BERT encoders with SMART regularisation.

Public entry points: smarter_fast.ops (attention, attention_varlen, adamw_step_, smart_noise,
smart_mse), smarter_fast.model (BertModel, MultitaskBert), smarter_fast.data
(load_tokenizer, CS224N readers, batching), smarter_fast.optim (AdamW), and the commands
`python -m smarter_fast.train | evaluate | info | build`.
"""

__version__ = "0.1.0"
