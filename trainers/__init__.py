"""Training and steering algorithms (imported as ``visalign.trainers``)."""
