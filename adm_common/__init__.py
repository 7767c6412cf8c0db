"""Small helpers shared by every layer (npz image batches, atomic files, hashing, launcher detection, YAML); imports
nothing from the rest of the project, and at import time only numpy and PyYAML from outside the standard library."""
