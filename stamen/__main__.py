from stamen.cli.main import main

main()
