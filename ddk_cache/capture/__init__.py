"""Stage 1, `ddk-cache build`: read a corpus, tokenize and pack it, score it with a teacher."""
