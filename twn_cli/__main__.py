from twn_cli.cli import app

app(prog_name="twn")
