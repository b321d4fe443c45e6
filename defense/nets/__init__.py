"""Model I/O: loading, saving and running Keras networks, and the architectures a weights-only file is loaded onto."""
