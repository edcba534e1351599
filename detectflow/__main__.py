from detectflow.cli import entry

entry()
