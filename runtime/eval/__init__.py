"""Evaluation outside the training processes: held-out loss of a committed checkpoint per source, beside
the loss of a unigram model of the same corpus (the bar a model that learned anything must clear)."""
