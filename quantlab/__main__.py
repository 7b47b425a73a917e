from quantlab.cli.main import entry

entry()
