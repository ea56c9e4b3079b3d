"""Training balconies: data sources and corpora, the distillation loss, the trainer."""
