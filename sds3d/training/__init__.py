"""Training: the shared loop (loop.py), teacher training (teacher.py), classifier training (classifier.py)."""
