"""CS224N readers, the WordPiece tokenizer, length-aware batching and task schedules."""
