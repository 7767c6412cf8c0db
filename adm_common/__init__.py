"""Small helpers shared by every layer (npz image batches, atomic files, hashing, launcher detection); imports
nothing from the rest of the project and only numpy from outside the standard library."""
