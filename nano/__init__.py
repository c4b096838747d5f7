"""illume-nano: a miniature ILLUME+ trained here on coloured shapes, so that what the runtime draws and says can be
checked (data generator, scorers, training and export scripts; committed weights under ``weights/``)."""
