"""Model families written only for the tests, registered through the model protocol."""
