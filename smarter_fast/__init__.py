"""smarter_fast: fast multi-task fine-tuning of BERT encoders with SMART regularisation.

The library: smarter_fast.model (BertModel, MultitaskBert, attach_grad_sinks), smarter_fast.ops
(attention, attention_varlen, adamw_step_, smart_noise, smart_mse, dropout_add_layer_norm),
smarter_fast.optim (AdamW, learning-rate schedules), smarter_fast.regularizers (SMART, EMA,
gradient surgery), smarter_fast.data (load_tokenizer, CS224N readers, batching, schedules),
smarter_fast.tasks (the task registry and losses), smarter_fast.evaluation. The training
application: smarter_fast.training. The commands: `python -m smarter_fast.train | evaluate |
ablate | info | build | selfcheck`. The layers: docs/design.md.
"""

__version__ = "0.1.0"
