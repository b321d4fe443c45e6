"""Data I/O: labelled image sets (h5, npz, image folders), one image file, and the valid/test `Split`."""
