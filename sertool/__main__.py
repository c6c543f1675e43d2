from sertool.cli import main

main()
