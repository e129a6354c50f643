module cisco-fmc

go 1.25
